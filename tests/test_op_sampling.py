"""Guidance + sampling + rank score: every fast variant in the kernels table (C++, Triton) vs the
PyTorch reference: the same tokens (the same counter-based noise), probabilities and scores,
top-k / top-p, greedy, masked frames, frames in any order, large vocabularies."""
import numpy as np
import pytest
import torch
from scipy import stats

from stemgen.kernels.rng import uniform
from stemgen.kernels.sampling import guide_sample_rank_ref

from helpers import NEEDS_CPP, on_device, variants

VARIANTS = variants("guide_sample_rank")


def guidance_weights(R):
    """Multi (3 rows), single (2) or no (1) guidance weights, each summing to 1."""
    return {3: torch.tensor([1.5, 1.2, -1.7]), 2: torch.tensor([2.0, -1.0]), 1: torch.ones(1)}[R]


# V up to 4096: Triton reads the vocabulary once per frame; 5000: its blockwise passes
CASES = [  # R, M, V, temperature, top_k, top_p
    (3, 1, 37, 1.0, 0, 1.0), (3, 7, 50, 0.7, 0, 1.0), (2, 20, 64, 1.3, 0, 1.0), (1, 5, 2048, 1.0, 0, 1.0),
    (3, 9, 33, 0.0, 0, 1.0), (3, 4, 5000, 1.0, 0, 1.0), (2, 3, 5000, 0.0, 0, 1.0), (3, 6, 5000, 0.5, 0, 1.0),
    (3, 65, 2048, 1.0, 0, 1.0), (3, 40, 64, 1.0, 5, 1.0), (3, 40, 64, 0.8, 0, 0.9), (2, 30, 50, 1.3, 10, 0.5),
    (1, 20, 2048, 1.0, 250, 0.95), (3, 25, 37, 1.0, 1, 1.0), (3, 25, 37, 0.7, 0, 0.05), (2, 9, 33, 0.0, 3, 0.5),
    (3, 64, 128, 1.2, 20, 0.8)]


@pytest.mark.parametrize("fn,dtype", VARIANTS)
@pytest.mark.parametrize("R,M,V,temperature,top_k,top_p", CASES)
def test_same_tokens_as_reference(fn, dtype, R, M, V, temperature, top_k, top_p):
    g = torch.Generator().manual_seed(M * V + top_k)
    logits = torch.randn(R, M, V, generator=g) * 3
    weights = guidance_weights(R)
    positions = torch.randperm(3 * M, generator=g)[:M]     # a subset of frames, any order
    masked = torch.rand(M, generator=g) < 0.8
    kw = dict(seed=77, level=1, step=3, temperature=temperature, top_k=top_k, top_p=top_p,
              w_confidence=0.1, w_causal=0.1, w_random=1.0)
    tr, pr, sr = guide_sample_rank_ref(logits, weights, positions, masked, 3 * M, **kw)
    tk, pk, sk = fn(logits, weights, positions, masked, 3 * M, **kw)
    assert torch.equal(tr, tk), (tr != tk).sum()
    # the token's probability: Triton's exp matches torch's to 1e-5; the C++ op's vectorised exp to 1e-4
    rtol, atol = (1e-4, 1e-6) if "cpp_ext" in fn.__module__ else (1e-5, 1e-7)
    assert torch.allclose(pr, pk, rtol=rtol, atol=atol)
    assert torch.equal(sr.isinf(), sk.isinf()) and torch.allclose(sr[masked], sk[masked], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn,dtype", VARIANTS)
def test_distribution_and_batch_independence(fn, dtype):
    """Chi-square on the samples; a frame's token does not depend on which other frames are in the
    call (the noise is a function of (seed, level, step, frame))."""
    V, M = 6, 800
    row = torch.tensor([0.5, -0.2, 1.0, 0.0, -1.0, 0.3])
    logits = row.expand(1, M, V).contiguous()
    tok, _, _ = fn(logits, torch.ones(1), torch.arange(M), torch.ones(M, dtype=torch.bool), M, seed=5, level=0, step=0)
    counts = np.bincount(tok.numpy(), minlength=V)
    p = row.double().softmax(-1).numpy()
    assert stats.chisquare(counts, p / p.sum() * M).pvalue > 1e-3
    sub = torch.tensor([10, 799, 7, 400])
    tok_sub, _, _ = fn(logits[:, :4], torch.ones(1), sub, torch.ones(4, dtype=torch.bool), M, seed=5, level=0, step=0)
    assert torch.equal(tok_sub, tok[sub])


@pytest.mark.parametrize("fn,dtype", VARIANTS)
def test_top_k_top_p_really_filter(fn, dtype):
    """With top-k 1 every frame takes its most likely code; a tiny top-p does the same."""
    logits = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0))
    args = (logits, torch.ones(1), torch.arange(16), torch.ones(16, dtype=torch.bool), 16)
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        assert torch.equal(fn(*args, seed=9, level=0, step=0, **kw)[0], logits[0].argmax(-1))
    assert not torch.equal(fn(*args, seed=9, level=0, step=0)[0], logits[0].argmax(-1))


def test_triton_filters_in_kernel_up_to_4096_codes_and_falls_back_beyond():
    pytest.importorskip("triton", reason="Triton not installed")
    from stemgen.kernels import sampling_triton as K

    def run(V, **kw):
        logits = torch.randn(1, 3, V, generator=torch.Generator().manual_seed(1))
        args = (logits, torch.ones(1), torch.arange(3), torch.ones(3, dtype=torch.bool), 3)
        before = K.fallbacks["top-k/top-p"]
        a, b = on_device(K.guide_sample_rank)(*args, seed=0, level=0, step=0, **kw), \
            guide_sample_rank_ref(*args, seed=0, level=0, step=0, **kw)
        assert torch.equal(a[0], b[0])
        return K.fallbacks["top-k/top-p"] - before

    assert run(2048, top_p=0.9) == 0 and run(2048, top_k=5) == 0
    assert run(5000, top_p=0.9) == 1


@NEEDS_CPP
def test_cpp_same_random_numbers_as_reference():
    from stemgen import cpp_ext

    idx = torch.arange(0, 5000) * 7919
    got = torch.tensor([cpp_ext._native.uniform(0x1234ABCD, int(i)) for i in idx])
    assert torch.equal(uniform(0x1234ABCD, idx), got)


@NEEDS_CPP
def test_cpp_checks_shapes():
    from stemgen import cpp_ext

    with pytest.raises(ValueError, match="positions"):
        cpp_ext.guide_sample_rank(torch.randn(2, 5, 8), torch.ones(2), torch.arange(4), torch.ones(5, dtype=torch.bool),
                                  5, seed=0, level=0, step=0)
    with pytest.raises(ValueError, match="position out of range"):
        cpp_ext.guide_sample_rank(torch.randn(1, 3, 8), torch.ones(1), torch.tensor([0, 1, 9]),
                                  torch.ones(3, dtype=torch.bool), 5, seed=0, level=0, step=0)
