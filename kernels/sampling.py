"""Guidance + sampling + causal-bias rank score for the level being decoded (SPEC section 4).

Guidance is a weighted sum of per-row log-softmaxes: multi-source CFG uses rows
(context only, instrument only, neither) with weights (l_a, l_i, 1 - l_a - l_i); single-source
uses (both, neither) with (l, 1 - l); no guidance one row with weight 1.
Sampling is Gumbel-max with counter-based noise (kernels.rng), so any backend that
computes the same hash picks the same token.
"""
from __future__ import annotations

import math

import torch

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


def guide_sample_rank_ref(logits: torch.Tensor, weights: torch.Tensor, *, seed: int, level: int,
                          step: int, masked: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                          top_p: float = 1.0, w_conf: float = 0.1, w_causal: float = 0.1,
                          w_rand: float = 1.0):
    """One request's step: logits [R, T, V] of the level being decoded, guidance weights [R],
    masked [T] bool (positions still to generate).

    Returns (tokens [T] int64, prob [T] fp32, score [T] fp32): the sampled token, its probability
    under the guided distribution (temperature 1, before filtering), and the rank score
    w_conf * prob + w_causal * (1 - n / T) + w_rand * U; positions not masked get token -1,
    prob 0 and score -inf.
    """
    R, T, V = logits.shape
    dev = logits.device
    guided = guided_logprobs(logits, weights)                        # [T, V]
    prob_all = guided.softmax(-1)
    if temperature <= 0:
        tokens = guided.argmax(-1)
    else:
        filt = filter_logits(guided / temperature, top_k, top_p)
        idx = torch.arange(T * V, device=dev, dtype=torch.int64).view(T, V)
        u = uniform(step_key(seed, level, step, STREAM_SAMPLE), idx)
        tokens = (filt - torch.log(-torch.log(u))).argmax(-1)
    prob = prob_all.gather(-1, tokens[:, None])[:, 0]
    pos = torch.arange(T, device=dev)
    u_rank = uniform(step_key(seed, level, step, STREAM_RANK), pos)
    score = w_conf * prob + w_causal * (1.0 - pos.float() / T) + w_rand * u_rank
    tokens = torch.where(masked, tokens, torch.full_like(tokens, -1))
    prob = torch.where(masked, prob, torch.zeros_like(prob))
    score = torch.where(masked, score, torch.full_like(score, -math.inf))
    return tokens, prob, score
