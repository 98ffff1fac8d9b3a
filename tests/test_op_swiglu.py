"""silu(gate) * up: every fast variant in the kernels table (C++, Triton) vs the PyTorch reference,
odd widths, every dtype each takes (two roundings: see test_op_norm's TOL)."""
import pytest
import torch

from stemgen.kernels.swiglu import silu_mul_ref

from helpers import NEEDS_CPP, variants
from test_op_norm import SHAPES, close


@pytest.mark.parametrize("fn,dtype", variants("silu_mul", (torch.float32, torch.bfloat16, torch.float16)))
@pytest.mark.parametrize("N,D", SHAPES)
def test_matches_reference(fn, dtype, N, D):
    gu = (torch.randn(N, 2 * D, generator=torch.Generator().manual_seed(D)) * 4).to(dtype)
    got = fn(gu)
    assert got.shape == (N, D) and close(got, silu_mul_ref(gu), dtype)


@pytest.mark.parametrize("fn,dtype", variants("silu_mul", (torch.float32, torch.bfloat16)))
def test_rows_do_not_depend_on_the_batch(fn, dtype):
    x = torch.randn(300, 256).to(dtype)
    assert torch.equal(fn(x)[7:8], fn(x[7:8]))


@pytest.mark.parametrize("fn,dtype", variants("silu_mul", (torch.float32, torch.bfloat16)))
def test_gates_beyond_exps_range(fn, dtype):
    """Gates where exp(-gate) underflows or overflows float32 (|gate| > 87): silu is ~0 below, the
    gate itself above (a vectorised exp that wraps its exponent bits gives silu(-100) = -100)."""
    gate = torch.tensor([-1e4, -200.0, -100.0, -89.5, -88.8, -87.5, -50.0, 50.0, 87.5, 88.8, 89.5, 100.0, 1e4])
    gu = torch.cat([gate, torch.ones_like(gate)])[None].to(dtype)
    got, want = fn(gu), silu_mul_ref(gu)
    assert close(got, want, dtype), (got, want)
    assert got[0, :7].abs().max() < 1e-12


@NEEDS_CPP
def test_cpp_checks_shapes():
    from stemgen import cpp_ext

    with pytest.raises(ValueError, match="silu_mul"):
        cpp_ext.silu_mul(torch.randn(3, 8).half())
