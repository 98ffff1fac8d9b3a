"""RMSNorm and residual add + RMSNorm: every fast variant in the kernels table (C++, Triton) vs the
PyTorch reference, odd widths, every dtype each takes; rows independent of the batch."""
import pytest
import torch

from stemgen.kernels.norm import add_rms_norm_ref, rms_norm_ref

from helpers import NEEDS_CPP, variants

SHAPES = [(1, 24), (3, 96), (257, 1000), (5, 37 * 2), (40, 17)]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Half-precision outputs are rounded twice (the normalised value, then the product with the gain),
# and at each rounding a variant and the reference can land one ulp apart when the exact value sits
# near a rounding boundary: two ulps, 2^-6 relative in bf16, 2^-9 in fp16. Triton's CPU interpreter
# truncates fp32 -> bf16 instead of rounding to nearest (checked: -131.8 -> -131): also at most one
# ulp per conversion.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -6, torch.float16: 2 ** -9}


def close(got, want, dtype):
    got, want = got.float(), want.float()
    return bool(((got - want).abs() <= TOL[dtype] * want.abs() + 1e-6).all())


def inputs(N, D, dtype):
    g = torch.Generator().manual_seed(N * D)
    x, delta = (torch.randn(N, D, generator=g) * 3).to(dtype), torch.randn(N, D, generator=g).to(dtype)
    return x, delta, torch.rand(D, generator=g).add(0.5).to(dtype)


@pytest.mark.parametrize("fn,dtype", variants("rms_norm", DTYPES))
@pytest.mark.parametrize("N,D", SHAPES)
def test_rms_norm_matches_reference(fn, dtype, N, D):
    x, _, w = inputs(N, D, dtype)
    got = fn(x, w, 1e-5)
    assert got.dtype == dtype and close(got, rms_norm_ref(x, w, 1e-5), dtype)


def interpreter_rounding(dtype) -> bool:
    import os
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("fn,dtype", variants("add_rms_norm", DTYPES))
@pytest.mark.parametrize("N,D", SHAPES)
def test_add_rms_norm_matches_reference(fn, dtype, N, D):
    """The residual add rounds once, as torch's (exact), except under the interpreter's bf16
    truncation; the norm of the sum within TOL."""
    x, delta, w = inputs(N, D, dtype)
    x_new, h = fn(x, delta, w, 1e-5)
    x_ref, h_ref = add_rms_norm_ref(x, delta, w, 1e-5)
    if torch.equal(x_new, x_ref):
        assert close(h, h_ref, dtype)
    else:
        assert interpreter_rounding(dtype) and "triton" in fn.__module__, "the residual add differs"
        assert close(x_new, x_ref, dtype) and close(h, rms_norm_ref(x_new, w, 1e-5), dtype)


@pytest.mark.parametrize("fn,dtype", variants("add_rms_norm", (torch.float32, torch.bfloat16)))
def test_rows_do_not_depend_on_the_batch(fn, dtype):
    """A row's result is the same alone or among others (the engine's batch invariance)."""
    x = torch.randn(300, 256).to(dtype)
    w = torch.rand(256).to(dtype)
    assert torch.equal(fn(x, x, w, 1e-5)[1][7:8], fn(x[7:8], x[7:8], w, 1e-5)[1])


@NEEDS_CPP
def test_cpp_checks_shapes():
    from stemgen import cpp_ext

    with pytest.raises(ValueError, match="add_rms_norm"):
        cpp_ext.add_rms_norm(torch.randn(3, 8), torch.randn(3, 7), torch.rand(8), 1e-5)
    with pytest.raises(ValueError, match="add_rms_norm"):
        cpp_ext.rms_norm(torch.randn(3, 8).half(), torch.rand(8), 1e-5)
