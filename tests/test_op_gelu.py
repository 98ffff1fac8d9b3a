"""Exact GELU (MAGNeT's feed-forward): every fast variant (Triton) vs the reference over odd sizes and
dtypes; the reference against the erf formula."""
import math

import pytest
import torch

from stemgen.kernels.gelu import gelu_ref

from helpers import variants
from test_op_norm import close

SIZES = [(1, 1), (3, 97), (257, 64), (2, 4099)]


def test_reference_is_the_erf_form():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    want = torch.tensor([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.tolist()], dtype=torch.float64)
    assert torch.allclose(gelu_ref(x), want, atol=1e-12)


@pytest.mark.parametrize("fn,dtype", variants("gelu", (torch.float32, torch.bfloat16, torch.float16)))
@pytest.mark.parametrize("N,D", SIZES)
def test_matches_reference(fn, dtype, N, D):
    x = (torch.randn(N, D, generator=torch.Generator().manual_seed(D)) * 4).to(dtype)
    got = fn(x)
    assert got.shape == x.shape and got.dtype == dtype and close(got, gelu_ref(x.float()).to(dtype), dtype)
