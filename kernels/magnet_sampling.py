"""MAGNeT's guidance + sampling for the level being decoded (audiocraft 1.3.0's
``MagnetLMModel._generate_stage``; SPEC section 9), one request's step over M frames:

  guided = uncond + (cond - uncond) * coef        (CFG on logits; coef annealed by the caller)
  probs  = softmax(guided / temperature)          (temperature annealed and floored by the caller)
  token  ~ probs restricted to the top-p nucleus (top_p > 0; audiocraft's sample_top_p: sorted,
           the prefix whose preceding mass is <= p, renormalised), else to the top-k (top_k > 0),
           else probs
  prob   = probs[token]                           (the confidence: the untruncated distribution)

Draws are inverse-CDF with one counter-based uniform per frame (kernels.rng), in the order audiocraft's
multinomial walks: the sorted nucleus for top-p, code order otherwise. A request's tokens depend only
on its seed, level, step and frames, never on its batch.
"""
from __future__ import annotations

import torch

from .registry import Op, Variant, register
from .rng import STREAM_SAMPLE, step_key, uniform


def inverse_cdf(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """p [M, V] (non-negative, any scale), u [M] in (0, 1) -> the first index whose running sum
    (fp64) exceeds u * total."""
    cdf = p.double().cumsum(-1)
    return (cdf <= (u.double() * cdf[:, -1])[:, None]).sum(-1).clamp(max=p.shape[-1] - 1)


def magnet_sample_ref(logits: torch.Tensor, positions: torch.Tensor, *, seed: int, level: int, step: int,
                      coef: float, temperature: float, top_k: int = 0, top_p: float = 0.9):
    """logits [R, M, V] fp32: rows (conditioned, unconditioned), or one row (no guidance);
    positions [M] int64 frame indices. Returns (tokens [M] int64, prob [M] fp32). A frame whose logits
    hold NaN or infinities gets token 0 and prob NaN (every variant)."""
    logits = logits.float()
    guided = logits[1] + (logits[0] - logits[1]) * coef if logits.shape[0] == 2 else logits[0]
    probs = torch.softmax(guided / temperature, dim=-1)
    u = uniform(step_key(seed, level, step, STREAM_SAMPLE), positions)
    if top_p > 0.0:
        srt, idx = torch.sort(probs, dim=-1, descending=True, stable=True)   # ties in code order
        drop = srt.cumsum(-1) - srt > top_p
        srt = srt * (~drop).float()
        srt = srt / srt.sum(-1, keepdim=True)
        tokens = idx.gather(-1, inverse_cdf(srt, u)[:, None])[:, 0]
    elif 0 < top_k < logits.shape[-1]:   # top-k of the whole vocabulary or more truncates nothing
        kth = torch.topk(probs, top_k, dim=-1).values[:, -1:]
        kept = probs * (probs >= kth).float()
        tokens = inverse_cdf(kept / kept.sum(-1, keepdim=True), u)
    else:
        tokens = inverse_cdf(probs, u)
    return tokens, probs.gather(-1, tokens[:, None])[:, 0]


def _selfcheck(fn, device, dtype) -> str | None:
    logits = torch.randn(2, 6, 50, generator=torch.Generator().manual_seed(0)).to(device)
    kw = dict(seed=1, level=0, step=0, coef=3.0, temperature=1.5, top_p=0.9)
    if not torch.equal(fn(logits, torch.arange(6, device=device), **kw)[0],
                       magnet_sample_ref(logits, torch.arange(6, device=device), **kw)[0]):
        return "MAGNeT sampling picks other tokens than its reference"
    return None


OP = register(Op("magnet_sample", "MAGNeT guidance+sampling", magnet_sample_ref, selfcheck=_selfcheck,
                 reference_label="PyTorch reference (audiocraft's order of operations)"),
              Variant("cpp", "..cpp_ext:magnet_sample", "C++ (cpp_ext)"),
              Variant("triton", ".magnet_sampling_triton:magnet_sample", "Triton"))
