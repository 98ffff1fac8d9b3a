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
TIES = [(2, 41, 2048, 1.0, 1.0, 0, 0.9), (1, 40, 300, 0.0, 0.7, 0, 0.5), (2, 33, 128, 2.0, 1.0, 5, 0.0)]


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
