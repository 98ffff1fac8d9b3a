"""LayerNorm and residual add + LayerNorm (MAGNeT): every fast variant in the kernels table (Triton)
vs the PyTorch reference, odd widths, every dtype (two roundings: see test_op_norm's TOL)."""
import pytest
import torch

from stemgen.kernels.layer_norm import add_layer_norm_ref, layer_norm_ref

from helpers import variants
from test_op_norm import SHAPES, interpreter_rounding

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def near(got, want_fp32, dtype) -> bool:
    """Against the fp32 computation: the gain and the bias round once more than RMSNorm's output, and a
    centred value near zero loses its relative precision: a few ulps of the row's scale."""
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    return torch.allclose(got.float(), want_fp32, rtol=4 * tol, atol=4 * tol * float(want_fp32.abs().max()))


def inputs(N, D, dtype):
    g = torch.Generator().manual_seed(N * D + 1)
    x, delta = (torch.randn(N, D, generator=g) * 3 + 1).to(dtype), torch.randn(N, D, generator=g).to(dtype)
    return x, delta, torch.rand(D, generator=g).add(0.5).to(dtype), torch.randn(D, generator=g).to(dtype)


def test_reference_is_the_textbook_formula():
    x, _, w, b = inputs(5, 37, torch.float64)
    want = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5) * w + b
    assert torch.allclose(layer_norm_ref(x, w, b, 1e-5), want, atol=1e-12)


@pytest.mark.parametrize("fn,dtype", variants("layer_norm", DTYPES))
@pytest.mark.parametrize("N,D", SHAPES)
def test_layer_norm_matches_reference(fn, dtype, N, D):
    x, _, w, b = inputs(N, D, dtype)
    got = fn(x, w, b, 1e-5)
    assert got.dtype == dtype and near(got, layer_norm_ref(x.float(), w.float(), b.float(), 1e-5), dtype)


@pytest.mark.parametrize("fn,dtype", variants("add_layer_norm", DTYPES))
@pytest.mark.parametrize("N,D", SHAPES)
def test_add_layer_norm_matches_reference(fn, dtype, N, D):
    x, delta, w, b = inputs(N, D, dtype)
    x_new, h = fn(x, delta, w, b, 1e-5)
    x_ref, h_ref = add_layer_norm_ref(x, delta, w, b, 1e-5)
    if not interpreter_rounding(dtype):
        assert torch.equal(x_new, x_ref)
    assert near(h, layer_norm_ref(x_new.float(), w.float(), b.float(), 1e-5), dtype)
