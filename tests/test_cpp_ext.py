"""C++ CPU ops vs their PyTorch references: odd shapes, both dtypes, MASK/NULL ids, bad ids."""
import pytest
import torch

from stemgen import cpp_ext
from stemgen.kernels.embedding import embed_sum_ref
from stemgen.kernels.rng import uniform
from stemgen.kernels.sampling import guide_sample_rank_ref


def test_extension_is_built():
    assert cpp_ext.available(), f"C++ extension {cpp_ext.status()}: pip install -e . needs g++"


@pytest.mark.parametrize("B,C,Q,T,dc,conds", [(1, 1, 4, 1, 16, [5]), (2, 3, 8, 257, 24, [17, 3]),
                                               (3, 2, 4, 7, 37, [17]), (1, 2, 4, 500, 128, [17, 4, 2])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embed_sum_matches_reference(B, C, Q, T, dc, conds, dtype):
    g = torch.Generator().manual_seed(T)
    V = 50
    tokens = torch.randint(0, V + 2, (B, C, Q, T), generator=g)          # codes, MASK and NULL
    conditions = torch.stack([torch.randint(0, n + 1, (B,), generator=g) for n in conds], dim=1)
    table = torch.randn(Q * (V + 2), dc, generator=g).to(dtype)
    ctable = torch.randn(sum(n + 1 for n in conds), dc, generator=g).to(dtype)
    offsets = torch.tensor([sum(n + 1 for n in conds[:i]) for i in range(len(conds))])
    want = embed_sum_ref(tokens, conditions, table, ctable, offsets)
    got = cpp_ext.embed_sum(tokens, conditions, table, ctable, offsets)
    assert got.dtype == dtype and got.shape == want.shape
    if dtype == torch.float32:   # same fp32 sums, another order: <= 1e-6 relative
        assert (got - want).abs().max() <= 1e-6 * want.abs().max()
    else:                        # fp32 accumulation, one bf16 rounding: within 1 bf16 ulp
        assert ((got.float() - want.float()).abs() <= want.float().abs() * 2 ** -7 + 1e-30).all()


def test_embed_sum_rejects_out_of_range_ids():
    table, ctable, off = torch.randn(4 * 10, 8), torch.randn(6, 8), torch.tensor([0])
    tokens = torch.zeros(1, 2, 4, 3, dtype=torch.long)
    tokens[0, 1, 2, 1] = 10
    with pytest.raises(ValueError, match="token id 10 out of range"):
        cpp_ext.embed_sum(tokens, torch.zeros(1, 1, dtype=torch.long), table, ctable, off)
    with pytest.raises(ValueError, match="condition 0 id 6 out of range"):
        cpp_ext.embed_sum(tokens.clamp(max=9), torch.full((1, 1), 6), table, ctable, off)
    with pytest.raises(ValueError, match="expected dtype"):
        cpp_ext.embed_sum(tokens.int(), torch.zeros(1, 1, dtype=torch.long), table, ctable, off)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        cpp_ext.embed_sum(tokens, torch.zeros(1, 1, dtype=torch.long), table.half(), ctable.half(), off)


CASES = [  # R, M, V, temperature, top_k, top_p
    (3, 257, 2048, 1.0, 0, 1.0), (1, 1, 37, 1.0, 0, 1.0), (2, 33, 64, 0.7, 0, 1.0), (3, 40, 101, 0.0, 0, 1.0),
    (3, 50, 64, 1.0, 10, 1.0), (2, 50, 64, 0.8, 0, 0.9), (3, 64, 128, 1.2, 20, 0.8)]


@pytest.mark.parametrize("R,M,V,temperature,top_k,top_p", CASES)
def test_guide_sample_rank_matches_reference(R, M, V, temperature, top_k, top_p):
    g = torch.Generator().manual_seed(M * V)
    logits = torch.randn(R, M, V, generator=g) * 3
    weights = torch.tensor([3.0, 2.5, -4.5][:R]) if R > 1 else torch.ones(1)
    positions = torch.randperm(4 * M, generator=g)[:M]                   # a subset of frames, any order
    masked = torch.rand(M, generator=g) < 0.8
    kw = dict(seed=123, level=2, step=5, temperature=temperature, top_k=top_k, top_p=top_p,
              w_confidence=0.1, w_causal=0.1, w_random=1.0)
    tr, pr, sr = guide_sample_rank_ref(logits, weights, positions, masked, 4 * M, **kw)
    tc, pc, sc = cpp_ext.guide_sample_rank(logits, weights, positions, masked, 4 * M, **kw)
    assert torch.equal(tr, tc), (tr != tc).sum()
    assert torch.allclose(pr, pc, rtol=1e-4, atol=1e-6)
    assert torch.equal(sr.isinf(), sc.isinf())
    assert torch.allclose(sr[masked], sc[masked], rtol=1e-5, atol=1e-6)


def test_same_random_numbers_as_reference():
    idx = torch.arange(0, 5000) * 7919
    want = uniform(0x1234ABCD, idx)
    got = torch.tensor([cpp_ext._native.uniform(0x1234ABCD, int(i)) for i in idx])
    assert torch.equal(want, got)


def test_guide_sample_rank_checks_shapes():
    with pytest.raises(ValueError, match="positions"):
        cpp_ext.guide_sample_rank(torch.randn(2, 5, 8), torch.ones(2), torch.arange(4), torch.ones(5, dtype=torch.bool),
                                  5, seed=0, level=0, step=0)
    with pytest.raises(ValueError, match="position out of range"):
        cpp_ext.guide_sample_rank(torch.randn(1, 3, 8), torch.ones(1), torch.tensor([0, 1, 9]),
                                  torch.ones(3, dtype=torch.bool), 5, seed=0, level=0, step=0)


@pytest.mark.parametrize("N,D,K,bins", [(1, 8, 1, 16), (250, 128, 4, 2048), (37, 20, 3, 100)])
def test_rvq_encode_matches_reference(N, D, K, bins):
    from stemgen.engine.codec import rvq_encode_ref

    g = torch.Generator().manual_seed(N)
    x = torch.randn(N, D, generator=g)
    books = torch.randn(K, bins, D, generator=g) * (0.6 ** torch.arange(K))[:, None, None]
    want = rvq_encode_ref(x, books)
    got = cpp_ext.rvq_encode(x, books)
    assert (got == want).float().mean() >= 0.999


@pytest.mark.parametrize("N,D", [(1, 24), (3, 96), (257, 1000), (5, 74), (40, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_and_swiglu_match_reference(N, D, dtype):
    """Residual add exact (one rounding, as torch); norm and silu * up within fp32 rounding (1e-5)
    or two bf16 ulps (two roundings, each can land one ulp apart)."""
    from stemgen.kernels.norm import add_rms_norm_ref, rms_norm_ref, silu_mul_ref
    g = torch.Generator().manual_seed(N + D)
    x, delta = (torch.randn(N, D, generator=g) * 3).to(dtype), torch.randn(N, D, generator=g).to(dtype)
    w = torch.rand(D, generator=g).add(0.5).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -6

    def close(a, b):
        a, b = a.float(), b.float()
        return bool(((a - b).abs() <= tol * b.abs() + 1e-6).all())

    x_new, h = cpp_ext.add_rms_norm(x, delta, w, 1e-5)
    x_ref, h_ref = add_rms_norm_ref(x, delta, w, 1e-5)
    assert torch.equal(x_new, x_ref) and close(h, h_ref)
    assert close(cpp_ext.rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5))
    gu = (torch.randn(N, 2 * D, generator=g) * 4).to(dtype)
    assert close(cpp_ext.silu_mul(gu), silu_mul_ref(gu))


def test_norm_rows_do_not_depend_on_the_batch():
    """A row's result is the same alone or among others (the engine's batch invariance)."""
    x = torch.randn(300, 256)
    w = torch.rand(256)
    alone = cpp_ext.add_rms_norm(x[7:8], x[7:8], w, 1e-5)[1]
    assert torch.equal(cpp_ext.add_rms_norm(x, x, w, 1e-5)[1][7:8], alone)
    assert torch.equal(cpp_ext.silu_mul(x)[7:8], cpp_ext.silu_mul(x[7:8]))


def test_norm_checks_shapes():
    with pytest.raises(ValueError, match="add_rms_norm"):
        cpp_ext.add_rms_norm(torch.randn(3, 8), torch.randn(3, 7), torch.rand(8), 1e-5)
    with pytest.raises(ValueError, match="silu_mul"):
        cpp_ext.silu_mul(torch.randn(3, 8).half())
