"""MAGNeT's attention ops against plain softmax(q k^T / sqrt(d)) v written out here: the band (|i - j|
<= window, inclusive, as audiocraft's restricted_context_attn_mask), packed requests of odd lengths
that never see each other, and cross-attention to each request's own memory length."""
import pytest
import torch

from stemgen.kernels.band_attention import band_attention_ref
from stemgen.kernels.cross_attention import cross_attention_ref


def naive(q, k, v, allowed=None):
    """q [Tq, H, d], k/v [Tk, H, d] -> [Tq, H * d] in fp64."""
    s = torch.einsum("qhd,khd->hqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v.double()).reshape(q.shape[0], -1)


@pytest.mark.parametrize("segments,windows", [([(2, 13)], [5]), ([(2, 13), (1, 4), (3, 7)], [None, 1, 5]),
                                              ([(1, 1)], [5]), ([(2, 11)], [0])])
def test_band_attention_against_naive(segments, windows):
    g = torch.Generator().manual_seed(len(segments))
    N = sum(R * T for R, T in segments)
    q, k, v = torch.randn(3, N, 2, 8, generator=g).unbind(0)
    got = band_attention_ref(q, k, v, segments, windows)
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
