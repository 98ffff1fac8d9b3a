"""MAGNeT's attention ops against plain softmax(q k^T / sqrt(d)) v written out here: the band (|i - j|
<= window, inclusive, as audiocraft's restricted_context_attn_mask), packed requests of odd lengths
that never see each other, and cross-attention to each request's own memory length."""
import pytest
import torch

from stemgen.kernels.band_attention import band_attention_ref
from stemgen.kernels.cross_attention import cross_attention_ref

from helpers import variants


def naive(q, k, v, allowed=None):
    """q [Tq, H, d], k/v [Tk, H, d] -> [Tq, H * d] in fp64."""
    s = torch.einsum("qhd,khd->hqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v.double()).reshape(q.shape[0], -1)


BANDS = [([(2, 13)], [5]), ([(2, 13), (1, 4), (3, 7)], [None, 1, 5]), ([(1, 1)], [5]), ([(2, 11)], [0]),
         # past the blocked form's block of 32 queries: odd lengths, a band wider than a block, full beside
         ([(2, 33)], [5]), ([(1, 97), (2, 64), (3, 40)], [5, 0, None]), ([(2, 100)], [40]), ([(1, 65)], [63])]
BAND_FNS = [pytest.param(band_attention_ref, torch.float32, id="reference"), *variants("band_attention")]


@pytest.mark.parametrize("fn,dtype", BAND_FNS)
@pytest.mark.parametrize("segments,windows", BANDS)
def test_band_attention_against_naive(fn, dtype, segments, windows):
    g = torch.Generator().manual_seed(len(segments))
    N = sum(R * T for R, T in segments)
    q, k, v = torch.randn(3, N, 2, 8, generator=g).unbind(0)
    got = fn(q, k, v, segments, windows)
    start = 0
    for (R, T), w in zip(segments, windows):
        i = torch.arange(T)
        allowed = None if w is None else (i[:, None] - i[None, :]).abs() <= w
        for r in range(R):
            rows = slice(start + r * T, start + (r + 1) * T)
            assert torch.allclose(got[rows].double(), naive(q[rows], k[rows], v[rows], allowed), atol=1e-5)
        start += R * T


def test_cross_attention_uses_each_requests_own_memory():
    g = torch.Generator().manual_seed(0)
    segments, lengths = [(1, 9), (2, 5)], [3, 11]
    q = torch.randn(9 + 10, 2, 8, generator=g)
    k, v = torch.randn(2, 14, 2, 8, generator=g).unbind(0)
    got = cross_attention_ref(q, k, v, segments, lengths)
    assert torch.allclose(got[:9].double(), naive(q[:9], k[:3], v[:3]), atol=1e-5)
    assert torch.allclose(got[9:].double(), naive(q[9:], k[3:], v[3:]), atol=1e-5)


@pytest.mark.parametrize("fn,dtype", variants("band_attention", (torch.float32, torch.bfloat16)))
def test_band_attention_variants_match_the_reference(fn, dtype):
    """MAGNeT-small's shape (16 heads of 64, band 5) at 500 and 517 frames, in the model's dtypes."""
    g = torch.Generator().manual_seed(1)
    segments, windows = [(2, 500), (2, 517)], [5, 5]
    q, k, v = (torch.randn(3, 2034, 16, 64, generator=g)).to(dtype).unbind(0)
    got, want = fn(q, k, v, segments, windows).float(), band_attention_ref(q, k, v, segments, windows).float()
    tol = 2e-6 if dtype == torch.float32 else 2e-2
    assert (got - want).abs().max() <= tol * want.abs().max(), (got - want).abs().max()
