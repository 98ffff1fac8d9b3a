"""Triton kernels vs their PyTorch references (under TRITON_INTERPRET=1 on the CPU: small shapes)."""

import numpy as np
import pytest
import torch
from scipy import stats

from stemgen.kernels import triton_ops as K
from stemgen.kernels.attention import attention_ref
from stemgen.kernels.embedding import embed_sum_ref
from stemgen.kernels.norm import add_rms_norm_ref, rms_norm_ref, silu_mul_ref
from stemgen.kernels.sampling import guide_sample_rank_ref
from stemgen.train import StemGenConfig

from helpers import load_engine_lm, make_model_dir, random_tokens


@pytest.mark.parametrize("B,C,Q,T,dc,conds", [(1, 1, 4, 1, 20, [5]), (2, 3, 8, 3, 24, [17, 3]),
                                               (1, 2, 4, 257, 48, [17]), (3, 2, 4, 7, 37, [4, 2, 2])])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2 ** -7), (torch.float16, 2 ** -10)])
def test_embed_sum(B, C, Q, T, dc, conds, dtype, tol):
    g = torch.Generator().manual_seed(T + C)
    V = 30
    tokens = torch.randint(0, V + 2, (B, C, Q, T), generator=g)   # MASK / NULL included
    conditions = torch.stack([torch.randint(0, n + 1, (B,), generator=g) for n in conds], dim=1)
    table = torch.randn(Q * (V + 2), dc, generator=g).to(dtype)
    ctable = torch.randn(sum(n + 1 for n in conds), dc, generator=g).to(dtype)
    offsets = torch.tensor([sum(n + 1 for n in conds[:i]) for i in range(len(conds))])
    want = embed_sum_ref(tokens, conditions, table, ctable, offsets).float()
    got = K.embed_sum(tokens, conditions, table, ctable, offsets, check=True).float()
    assert ((got - want).abs() <= tol * want.abs().max()).all()


def test_embed_sum_check_rejects_bad_ids():
    with pytest.raises(ValueError, match="token ids"):
        K.embed_sum(torch.full((1, 1, 4, 2), 99), torch.zeros(1, 1, dtype=torch.long), torch.randn(40, 8),
                    torch.randn(3, 8), torch.tensor([0]), check=True)


def rope_tables(T, dh):
    ang = torch.outer(torch.arange(T, dtype=torch.float64), 1 / 10000 ** (torch.arange(0, dh, 2).double() / dh))
    return ang.cos().float(), ang.sin().float()


@pytest.mark.parametrize("dh", [64, 128, 24])
@pytest.mark.parametrize("segments", [[(1, 1)], [(3, 3)], [(2, 257)], [(3, 9), (2, 1), (1, 40)]])
def test_attention(dh, segments):
    """Packed sequences of unequal lengths, RoPE inside the kernel, fp32 within 1e-5 relative."""
    if dh == 128 and segments == [(2, 257)]:
        segments = [(1, 130)]  # keep the interpreter quick
    g = torch.Generator().manual_seed(dh)
    H = 2
    N = sum(R * T for R, T in segments)
    qkv = torch.randn(N, 3, H, dh, generator=g)
    q, k, v = qkv.unbind(1)                                      # strided views, as in the engine
    cos, sin = rope_tables(max(T for _, T in segments), dh)
    want = attention_ref(q, k, v, segments, cos, sin)
    got = K.attention(q, k, v, segments, cos, sin, block_m=32, block_n=32)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="Triton's CPU interpreter gets tl.dot on bf16 wrong (a 16x16 bf16 dot is off by 1e10 "
                           "there); this check needs a GPU")
def test_attention_bf16_loose():
    g = torch.Generator().manual_seed(1)
    segments = [(2, 33), (1, 5)]
    q, k, v = torch.randn(3, 71, 2, 64, generator=g).to(torch.bfloat16).unbind(0)
    cos, sin = rope_tables(33, 64)
    want = attention_ref(q.float(), k.float(), v.float(), segments, cos, sin)
    got = K.attention(q, k, v, segments, cos, sin, block_m=16, block_n=16).float()
    assert (got - want).abs().max() <= 3e-2 * want.abs().max()   # bf16 inputs: loose


NORM_SHAPES = [(1, 24), (3, 96), (257, 1000), (5, 37 * 2)]
# Half-precision outputs are rounded twice (the normalised value or silu(gate), then the product),
# and at each rounding the kernel and the reference can land one ulp apart when the exact value
# sits near a rounding boundary (seen: PyTorch's fp16 silu is itself one ulp off the correctly
# rounded value there): two ulps, 2^-6 relative in bf16, 2^-9 in fp16. Triton's CPU interpreter
# truncates fp32 -> bf16 instead of rounding to nearest (checked: -131.8 -> -131): also at most
# one ulp per conversion.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -6, torch.float16: 2 ** -9}


def close(got, want, dtype):
    got, want = got.float(), want.float()
    return bool(((got - want).abs() <= TOL[dtype] * want.abs() + 1e-6).all())


@pytest.mark.parametrize("N,D", NORM_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_and_fused_residual_add(N, D, dtype):
    g = torch.Generator().manual_seed(N * D)
    x, delta = (torch.randn(N, D, generator=g) * 3).to(dtype), torch.randn(N, D, generator=g).to(dtype)
    w = torch.rand(D, generator=g).add(0.5).to(dtype)
    assert close(K.rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5), dtype)
    x_new, h = K.add_rms_norm(x, delta, w, 1e-5)
    x_ref, h_ref = add_rms_norm_ref(x, delta, w, 1e-5)
    if dtype != torch.bfloat16 or torch.cuda.is_available():
        assert torch.equal(x_new, x_ref)   # the add rounds once, the same way
    else:                                  # the interpreter truncates instead (see TOL)
        assert close(x_new, x_ref, dtype)
    assert close(h, h_ref if torch.equal(x_new, x_ref) else rms_norm_ref(x_new, w, 1e-5), dtype)


@pytest.mark.parametrize("N,D", NORM_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_silu_mul(N, D, dtype):
    gu = (torch.randn(N, 2 * D, generator=torch.Generator().manual_seed(D)) * 4).to(dtype)
    assert close(K.silu_mul(gu), silu_mul_ref(gu), dtype)


def guidance_weights(R):
    """Multi (3 rows), single (2) or no (1) guidance weights, each summing to 1."""
    return {3: torch.tensor([1.5, 1.2, -1.7]), 2: torch.tensor([2.0, -1.0]), 1: torch.ones(1)}[R]


# V up to 4096: one read of the vocabulary per frame; 5000: the blockwise passes
CASES = [(3, 1, 37, 1.0), (3, 7, 50, 0.7), (2, 20, 64, 1.3), (1, 5, 2048, 1.0), (3, 9, 33, 0.0), (3, 4, 5000, 1.0),
         (2, 3, 5000, 0.0), (3, 6, 5000, 0.5)]


@pytest.mark.parametrize("R,M,V,temperature", CASES)
def test_guide_sample_rank_same_tokens(R, M, V, temperature):
    g = torch.Generator().manual_seed(M * V)
    logits = torch.randn(R, M, V, generator=g)
    weights = guidance_weights(R)
    positions = torch.randperm(3 * M, generator=g)[:M]
    masked = torch.rand(M, generator=g) < 0.8
    kw = dict(seed=77, level=1, step=3, temperature=temperature)
    tr, pr, sr = guide_sample_rank_ref(logits, weights, positions, masked, 3 * M, **kw)
    tk, pk, sk = K.guide_sample_rank(logits, weights, positions, masked, 3 * M, **kw)
    assert torch.equal(tr, tk)
    assert torch.allclose(pr, pk, rtol=1e-5, atol=1e-7)
    assert torch.equal(sr.isinf(), sk.isinf()) and torch.allclose(sr[masked], sk[masked], rtol=1e-5, atol=1e-6)


def test_guide_sample_rank_distribution_and_batch_independence():
    """Chi-square on the kernel's samples; a frame's token does not depend on which other frames
    are in the launch (the noise is a function of (seed, level, step, frame))."""
    V, M = 6, 3000
    row = torch.tensor([0.5, -0.2, 1.0, 0.0, -1.0, 0.3])
    logits = row.expand(1, M, V).contiguous()
    positions = torch.arange(M)
    tok, _, _ = K.guide_sample_rank(logits, torch.ones(1), positions, torch.ones(M, dtype=torch.bool), M,
                                    seed=5, level=0, step=0)
    counts = np.bincount(tok.numpy(), minlength=V)
    p = row.double().softmax(-1).numpy()
    assert stats.chisquare(counts, p / p.sum() * M).pvalue > 1e-3
    sub = torch.tensor([10, 2999, 7, 1500])
    tok_sub, _, _ = K.guide_sample_rank(logits[:, :4], torch.ones(1), sub, torch.ones(4, dtype=torch.bool), M,
                                        seed=5, level=0, step=0)
    assert torch.equal(tok_sub, tok[sub])


@pytest.mark.parametrize("R,M,V,temperature,top_k,top_p", [
    (3, 40, 64, 1.0, 5, 1.0), (3, 40, 64, 0.8, 0, 0.9), (2, 30, 50, 1.3, 10, 0.5), (1, 20, 2048, 1.0, 250, 0.95),
    (3, 25, 37, 1.0, 1, 1.0), (3, 25, 37, 0.7, 0, 0.05), (2, 9, 33, 0.0, 3, 0.5)])
def test_top_k_top_p_in_kernel_same_tokens(R, M, V, temperature, top_k, top_p):
    """Top-k / top-p thresholds found by bisection equal the reference's sort-based filter."""
    g = torch.Generator().manual_seed(V + top_k)
    logits = torch.randn(R, M, V, generator=g) * 2
    weights = guidance_weights(R)
    args = (logits, weights, torch.arange(M), torch.ones(M, dtype=torch.bool), M)
    kw = dict(seed=3, level=0, step=1, temperature=temperature, top_k=top_k, top_p=top_p)
    before = K.fallbacks["top-k/top-p"]
    a, b = K.guide_sample_rank(*args, **kw), guide_sample_rank_ref(*args, **kw)
    assert K.fallbacks["top-k/top-p"] == before, "ran in the kernel"
    assert torch.equal(a[0], b[0])
    assert torch.allclose(a[1], b[1], rtol=1e-5, atol=1e-7)


def test_top_k_top_p_filters_really_apply():
    """With top-k 1 every frame takes its most likely code; a tiny top-p does the same."""
    logits = torch.randn(1, 50, 64, generator=torch.Generator().manual_seed(0))
    args = (logits, torch.ones(1), torch.arange(50), torch.ones(50, dtype=torch.bool), 50)
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        assert torch.equal(K.guide_sample_rank(*args, seed=9, level=0, step=0, **kw)[0], logits[0].argmax(-1))
    free = K.guide_sample_rank(*args, seed=9, level=0, step=0)[0]
    assert not torch.equal(free, logits[0].argmax(-1))


def test_top_k_top_p_large_vocabulary_falls_back_to_reference():
    before = K.fallbacks["top-k/top-p"]
    logits = torch.randn(1, 3, 5000, generator=torch.Generator().manual_seed(1))
    args = (logits, torch.ones(1), torch.arange(3), torch.ones(3, dtype=torch.bool), 3)
    a = K.guide_sample_rank(*args, seed=0, level=0, step=0, top_p=0.9)
    b = guide_sample_rank_ref(*args, seed=0, level=0, step=0, top_p=0.9)
    assert torch.equal(a[0], b[0]) and K.fallbacks["top-k/top-p"] == before + 1


def test_engine_forward_with_kernels_equals_reference(tmp_path):
    from stemgen.engine.backend import triton_ops

    cfg = StemGenConfig(d_model=48, n_heads=2, n_layers=2, codebook_size=40, ffn_multiple_of=16, n_channels=2)
    _, d = make_model_dir(tmp_path, cfg)
    ref_lm, tri_lm = load_engine_lm(d), load_engine_lm(d)
    tri_lm.ops = triton_ops(torch.float32)
    gen = torch.Generator().manual_seed(0)
    reqs = []
    for R, T, level in [(3, 11, 0), (1, 4, 2)]:
        tokens, conds = random_tokens(cfg, R, T, gen)
        reqs.append((tokens, conds, level, None))
    for want, got in zip(ref_lm.forward_requests(reqs), tri_lm.forward_requests(reqs)):
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_selfcheck_passes_and_a_failing_kernel_falls_back_loudly(monkeypatch, caplog):
    """The engine self-checks the Triton kernels once per device; a kernel that fails to compile or
    disagrees is reported (log + `stemgen info` names) and the reference ops run instead, unless
    STEMGEN_BACKEND=triton demanded Triton (then a clear error)."""
    from stemgen.engine import backend
    from stemgen.kernels import triton_ops as K
    from stemgen.kernels.attention import attention_ref

    cpu = torch.device("cpu")
    backend._selfcheck.clear()
    assert backend.triton_selfcheck(cpu, torch.float32) is None
    monkeypatch.setenv("STEMGEN_BACKEND", "triton")
    assert backend.select_ops(cpu, torch.float32).attention is K.attention

    def broken(*a, **k):
        raise RuntimeError("PTX compilation failed")

    backend._selfcheck.clear()
    monkeypatch.setattr(K, "attention", broken)
    with pytest.raises(RuntimeError, match="self-check: RuntimeError: PTX compilation failed"):
        backend.select_ops(cpu, torch.float32)
    backend._selfcheck.clear()
    if not torch.cuda.is_available():  # auto on a "cuda" device that cannot run: loud fallback
        monkeypatch.setenv("STEMGEN_BACKEND", "auto")
        import logging
        monkeypatch.setattr(logging.getLogger("stemgen"), "propagate", True)  # the CLI tests route it to stderr
        with caplog.at_level("WARNING", logger="stemgen"):
            ops = backend.select_ops(torch.device("cuda"), torch.float32)
        assert ops.attention is attention_ref and "self-check" in ops.names["attention"]
        assert any("self-check" in r.getMessage() for r in caplog.records)
    backend._selfcheck.clear()
