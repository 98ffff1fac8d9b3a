"""Guidance + sampling + causal-bias rank score for the level being decoded (SPEC section 4).

Guidance is a weighted sum of per-row log-softmaxes: multi-source CFG uses rows
(context only, instrument only, neither) with weights (l_a, l_i, 1 - l_a - l_i); single-source
uses (both, neither) with (l, 1 - l); no guidance one row with weight 1.
Sampling is inverse-CDF with ONE counter-based uniform per frame (kernels.rng): the first code
whose running sum of unnormalised probabilities exp(z - max z) (accumulated in fp64, in code
order) exceeds u * total. Any backend that computes the same hash picks the same token, up to
last-bit differences of exp that matter only when u lands on a code boundary.
"""
from __future__ import annotations

import math

import torch

from .registry import Op, Variant, register
from .rng import STREAM_RANK, STREAM_SAMPLE, step_key, uniform


def guided_logprobs(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """logits [R, T, V], weights [R] -> unnormalised guided log-probabilities [T, V] (fp32)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return torch.einsum("r,rtv->tv", weights.float().to(logp.device), logp)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k / top-p (nucleus) filtering on [T, V]; removed entries become -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if 0.0 < top_p < 1.0:
        srt, idx = logits.sort(dim=-1, descending=True)
        cum = srt.softmax(-1).cumsum(-1)
        drop_sorted = (cum - srt.softmax(-1)) >= top_p  # keep the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def guide_sample_rank_ref(logits: torch.Tensor, weights: torch.Tensor, positions: torch.Tensor,
                          masked: torch.Tensor, length: int, *, seed: int, level: int, step: int,
                          temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, w_confidence: float = 0.1,
                          w_causal: float = 0.1, w_random: float = 1.0):
    """One request's step over M candidate frames.

    logits [R, M, V]: the guidance rows' logits of the level being decoded at frames
    ``positions`` [M] (int64 frame indices in 0..length-1); weights [R]: guidance weights;
    masked [M] bool: frames still to generate (others are skipped).

    Returns (tokens [M] int64, prob [M] fp32, score [M] fp32): the sampled token, its probability
    under the guided distribution (temperature 1, before top-k/top-p), and the causal-bias rank
    score w_confidence * prob + w_causal * (1 - n / length) + w_random * U(n); skipped frames get token -1,
    prob 0 and score -inf. Noise depends only on (seed, level, step, frame).
    """
    R, M, V = logits.shape
    guided = guided_logprobs(logits, weights)                        # [M, V]
    if temperature <= 0:
        tokens = guided.argmax(-1)
    else:
        z = filter_logits(guided / temperature, top_k, top_p)
        cdf = (z - z.max(-1, keepdim=True).values).exp().double().cumsum(-1)
        u = uniform(step_key(seed, level, step, STREAM_SAMPLE), positions).double()
        tokens = (cdf <= (u * cdf[:, -1])[:, None]).sum(-1).clamp(max=V - 1)  # first code with cdf > u*total
    prob = (guided.gather(-1, tokens[:, None])[:, 0] - guided.logsumexp(-1)).exp()
    u_rank = uniform(step_key(seed, level, step, STREAM_RANK), positions)
    score = w_confidence * prob + w_causal * (1.0 - positions.float() / length) + w_random * u_rank
    tokens = torch.where(masked, tokens, torch.full_like(tokens, -1))
    prob = torch.where(masked, prob, torch.zeros_like(prob))
    score = torch.where(masked, score, torch.full_like(score, -math.inf))
    return tokens, prob, score


def _selfcheck(fn, device, dtype) -> str | None:
    logits = torch.randn(3, 6, 50, generator=torch.Generator().manual_seed(0)).to(device)
    args = (logits, torch.tensor([1.5, 1.0, -1.5], device=device), torch.arange(6, device=device),
            torch.ones(6, dtype=torch.bool, device=device), 6)
    if not torch.equal(fn(*args, seed=1, level=0, step=0)[0], guide_sample_rank_ref(*args, seed=1, level=0, step=0)[0]):
        return "guidance+sampling picks other tokens than its reference"
    return None


OP = register(
    Op("guide_sample_rank", "guidance+sampling", guide_sample_rank_ref, selfcheck=_selfcheck),
    Variant("cpp", "..cpp_ext:guide_sample_rank", "C++ (cpp_ext)"),
    Variant("triton", ".sampling_triton:guide_sample_rank",
            "Triton (top-k/top-p included up to 4096 codes; larger: PyTorch reference)"))
