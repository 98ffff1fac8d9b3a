"""Embedding-sum: every fast variant in the kernels table (C++, Triton) vs the PyTorch reference,
odd shapes, MASK/NULL ids, every dtype each takes; and each one's handling of bad ids."""
import pytest
import torch

from stemgen.kernels.embedding import embed_sum_ref

from helpers import NEEDS_CPP, on_device, variants

# fp32: the same sums in another order; half precision: fp32 accumulation, one rounding (one ulp)
TOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


@pytest.mark.parametrize("fn,dtype", variants("embed_sum", (torch.float32, torch.bfloat16, torch.float16)))
@pytest.mark.parametrize("B,C,Q,T,dc,conds", [(1, 1, 4, 1, 20, [5]), (2, 3, 8, 3, 24, [17, 3]),
                                               (1, 2, 4, 130, 48, [17]), (3, 2, 4, 7, 37, [4, 2, 2])])
def test_matches_reference(fn, dtype, B, C, Q, T, dc, conds):
    g = torch.Generator().manual_seed(T + C)
    V = 30
    tokens = torch.randint(0, V + 2, (B, C, Q, T), generator=g)   # codes, MASK and NULL
    conditions = torch.stack([torch.randint(0, n + 1, (B,), generator=g) for n in conds], dim=1)
    table = torch.randn(Q * (V + 2), dc, generator=g).to(dtype)
    ctable = torch.randn(sum(n + 1 for n in conds), dc, generator=g).to(dtype)
    offsets = torch.tensor([sum(n + 1 for n in conds[:i]) for i in range(len(conds))])
    want = embed_sum_ref(tokens, conditions, table, ctable, offsets)
    got = fn(tokens, conditions, table, ctable, offsets)
    assert got.dtype == dtype and got.shape == want.shape
    # fp32: the C++ op sums in the reference's order up to reassociation (1e-6), Triton within 1e-5
    tol = 1e-6 if dtype == torch.float32 and "cpp_ext" in fn.__module__ else TOL[dtype]
    assert ((got.float() - want.float()).abs() <= tol * want.float().abs().max()).all()


def test_triton_check_rejects_bad_ids():
    pytest.importorskip("triton", reason="Triton not installed")
    from stemgen.kernels.embedding_triton import embed_sum

    with pytest.raises(ValueError, match="token ids"):
        on_device(embed_sum)(torch.full((1, 1, 4, 2), 99), torch.zeros(1, 1, dtype=torch.long), torch.randn(40, 8),
                  torch.randn(3, 8), torch.tensor([0]), check=True)


@NEEDS_CPP
def test_cpp_rejects_out_of_range_ids():
    from stemgen import cpp_ext

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
