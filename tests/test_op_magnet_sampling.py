"""MAGNeT's guidance + sampling: every fast variant (C++) vs the PyTorch reference (whose order of
operations is audiocraft's, checked step by step in tests/test_magnet*.py): same tokens, same
confidence, over odd sizes, CFG on and off, top-p / top-k / neither, tempered and nearly greedy."""
import pytest
import torch

from stemgen.kernels.magnet_sampling import magnet_sample_ref

from helpers import variants

CASES = [  # R, M, V, coef, temperature, top_k, top_p
    (2, 37, 256, 10.0, 2.85, 0, 0.9),
    (2, 5, 2048, 3.0, 0.3, 0, 0.9),
    (2, 64, 2048, 1.0, 0.01, 0, 0.9),       # the last step: temperature floored at 1e-2
    (1, 17, 129, 0.0, 1.0, 0, 0.0),         # no guidance, no truncation
    (2, 23, 300, 5.5, 1.7, 7, 0.0),         # top-k when top-p is off
    (2, 9, 50, 2.0, 1.0, 1, 0.0),           # top-k 1: greedy
    (2, 11, 64, 4.0, 1.2, 0, 1.0),          # top-p 1: keeps everything
]
# top-p 1: the nucleus keeps every code, so the order of equal probabilities decides the sorted draw. (Where
# a nucleus boundary falls inside a group of equal probabilities, which of them it keeps depends on the
# last bit of each implementation's softmax: exact only for exactly equal logits, tested below.)
TIES = [(2, 41, 2048, 1.0, 1.0, 0, 1.0), (1, 40, 300, 0.0, 0.7, 0, 1.0), (2, 33, 128, 2.0, 1.0, 5, 0.0)]


@pytest.mark.parametrize("fn,dtype", variants("magnet_sample"))
@pytest.mark.parametrize("R,M,V,coef,temperature,top_k,top_p", CASES)
def test_matches_reference(fn, dtype, R, M, V, coef, temperature, top_k, top_p):
    g = torch.Generator().manual_seed(M * V)
    logits = torch.randn(R, M, V, generator=g) * 3
    positions = torch.randperm(500, generator=g)[:M]
    kw = dict(seed=11, level=2, step=3, coef=coef, temperature=temperature, top_k=top_k, top_p=top_p)
    tok, prob = fn(logits, positions, **kw)
    ref_tok, ref_prob = magnet_sample_ref(logits, positions, **kw)
    assert torch.equal(tok, ref_tok)
    assert torch.allclose(prob, ref_prob, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fn,dtype", variants("magnet_sample"))
@pytest.mark.parametrize("R,M,V,coef,temperature,top_k,top_p", TIES)
def test_equal_probabilities_in_code_order(fn, dtype, R, M, V, coef, temperature, top_k, top_p):
    """Logits on a coarse grid (as half precision gives): many codes share a probability, at the
    nucleus boundary and where the draw crosses; the descending order keeps them in code order."""
    g = torch.Generator().manual_seed(V + M)
    logits = (torch.randn(R, M, V, generator=g) * 2).round() / 2
    positions = torch.arange(M) * 7
    kw = dict(seed=3, level=0, step=5, coef=coef, temperature=temperature, top_k=top_k, top_p=top_p)
    tok, prob = fn(logits, positions, **kw)
    ref_tok, ref_prob = magnet_sample_ref(logits, positions, **kw)
    assert torch.equal(tok, ref_tok)
    assert torch.allclose(prob, ref_prob, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fn,dtype", variants("magnet_sample"))
def test_draws_depend_on_the_frame_not_the_batch(fn, dtype):
    logits = torch.randn(2, 40, 128, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(100, 140)
    kw = dict(seed=5, level=0, step=1, coef=3.0, temperature=1.0, top_p=0.9)
    full = fn(logits, pos, **kw)[0]
    assert torch.equal(fn(logits[:, 10:13], pos[10:13], **kw)[0], full[10:13])


def _same_as_reference(fn, logits, positions, **kw):
    tok, prob = fn(logits, positions, **kw)
    ref_tok, ref_prob = magnet_sample_ref(logits, positions, **kw)
    assert torch.equal(tok, ref_tok), (tok != ref_tok).nonzero()[:, 0].tolist()
    assert torch.allclose(prob, ref_prob, rtol=1e-5, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("fn,dtype", variants("magnet_sample"))
@pytest.mark.parametrize("V,top_p", [(1000, 0.9), (1000, 0.5), (1035, 0.8)])
def test_nucleus_boundary_rounds_as_the_reference(fn, dtype, V, top_p):
    """Equal logits (every implementation's softmax gives exactly 1/V) whose running mass lands on
    top_p (V * top_p whole): which codes the nucleus keeps depends on the rounding of the running sum
    (torch's CPU cumsum: fp64, each prefix rounded to fp32), mirrored by every variant. (Unequal
    probabilities within an fp32 rounding of the boundary depend on the last bit of each softmax.)"""
    M = 32
    _same_as_reference(fn, torch.zeros(1, M, V), torch.arange(M), seed=0, level=0, step=0, coef=0.0,
                       temperature=1.0, top_p=top_p)


@pytest.mark.parametrize("fn,dtype", variants("magnet_sample"))
def test_cfg_rounds_as_two_float_ops(fn, dtype):
    """uncond + (cond - uncond) * coef with the multiply and the add rounded apart (no fused
    multiply-add): code 0's guided logit is exactly 3.0 that way (2.9999998 fused), tied with code 1's;
    with top-k 1 and with a nucleus of the first code, the tie decides the token."""
    M = 64
    L = torch.full((2, M, 4), -20.0)
    L[0, :, 0], L[1, :, 0] = 0.35537010431289673, -0.9669447541236877
    L[0, :, 1], L[1, :, 1] = 1.0, 0.0
    for kw in (dict(top_p=0.0, top_k=1), dict(top_p=0.4)):
        _same_as_reference(fn, L, torch.arange(M), seed=0, level=0, step=0, coef=3.0, temperature=1.0, **kw)


@pytest.mark.parametrize("fn,dtype", variants("magnet_sample"))
def test_non_finite_logits_and_edge_sizes(fn, dtype):
    """A frame with a NaN, an infinite logit, or -inf in both guidance rows: token 0 and prob NaN in
    every variant (the reference's order); other frames unaffected. top-k past the vocabulary
    truncates nothing; no frames, no tokens."""
    g = torch.Generator().manual_seed(3)
    L = torch.randn(2, 6, 50, generator=g)
    L[0, 1, 7] = float("nan")
    L[0, 2, 9] = float("inf")
    L[:, 3, 4] = float("-inf")
    tok, prob = fn(L, torch.arange(6), seed=1, level=0, step=0, coef=3.0, temperature=1.0, top_p=0.9)
    assert tok[1:4].tolist() == [0, 0, 0] and prob[1:4].isnan().all() and not prob[[0, 4, 5]].isnan().any()
    _same_as_reference(fn, L, torch.arange(6), seed=1, level=0, step=0, coef=3.0, temperature=1.0, top_p=0.9)
    for top_k in (50, 51, 4000):
        _same_as_reference(fn, L[:, [0, 4, 5]], torch.arange(3), seed=1, level=0, step=2, coef=3.0, temperature=1.0,
                           top_k=top_k, top_p=0.0)
    tok, prob = fn(L[:, :0], torch.arange(0), seed=1, level=0, step=0, coef=3.0, temperature=1.0, top_p=0.9)
    assert tok.shape == prob.shape == (0,)
