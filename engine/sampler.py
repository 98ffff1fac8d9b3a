"""Level-by-level iterative masked decoding (SPEC section 4) for one request.

Levels are decoded coarse to fine; while level q is decoded, target levels < q are fixed and
visible and levels > q are MASK. Each step samples every still-masked position of level q from
the guided distribution, ranks the candidates (causal bias) and keeps the best-ranked ones so
that the number still masked follows the cosine schedule; fixed (given) tokens never change.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..kernels.sampling import guide_sample_rank_ref
from .config import LMConfig, SamplingConfig


def masked_after_step(t: int, n_steps: int, n_masked: int) -> int:
    """Positions of a level still masked after step t (0-based) of n_steps: cosine rule."""
    if t >= n_steps - 1:
        return 0
    return math.floor(math.cos(math.pi / 2 * (t + 1) / n_steps) * n_masked)


def guidance_rows(context: torch.Tensor, target: torch.Tensor, conditions: torch.Tensor,
                  guidance: str, cfg: LMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """context [C-1, Q, T], target [Q, T], conditions [S] -> tokens [R, C, Q, T], conditions [R, S].

    multi: (context, no condition), (no context, condition), (neither); single: (both), (neither);
    none: (both). A dropped context is NULL tokens; dropped conditions are each table's NULL row."""
    full = torch.cat([context, target[None]], dim=0)
    null_ctx = torch.cat([torch.full_like(context, cfg.null_id), target[None]], dim=0)
    null_cond = torch.tensor(cfg.cond_sizes, dtype=conditions.dtype, device=conditions.device)
    rows = {"multi": [(full, null_cond), (null_ctx, conditions), (null_ctx, null_cond)],
            "single": [(full, conditions), (null_ctx, null_cond)],
            "none": [(full, conditions)]}[guidance]
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def check_request(context: torch.Tensor, conditions: torch.Tensor, target: torch.Tensor | None,
                  cfg: LMConfig, sampling: SamplingConfig) -> None:
    C, Q, V = cfg.n_channels, cfg.n_q, cfg.codebook_size
    if context.dim() != 3 or context.shape[0] != C - 1 or context.shape[1] != Q:
        raise ValueError(f"context tokens must have shape [{C - 1}, {Q}, T] (context channels, levels, "
                         f"frames), got {list(context.shape)}")
    T = context.shape[-1]
    if T < 1:
        raise ValueError("context has no frames (T = 0)")
    if context.numel() and ((context < 0) | ((context >= V) & (context != cfg.null_id))).any():
        raise ValueError(f"context tokens must be codes in [0, {V}) or NULL ({cfg.null_id})")
    if conditions.shape != (len(cfg.cond_sizes),):
        raise ValueError(f"conditions must have shape [{len(cfg.cond_sizes)}], got {list(conditions.shape)}")
    for s, n in enumerate(cfg.cond_sizes):
        if not 0 <= int(conditions[s]) <= n:
            raise ValueError(f"condition {s} is {int(conditions[s])}, expected 0..{n - 1} (or NULL = {n})")
    if target is not None:
        if tuple(target.shape) != (Q, T):
            raise ValueError(f"target tokens must have shape [{Q}, {T}], got {list(target.shape)}")
        if ((target < 0) | (target > cfg.mask_id)).any():
            raise ValueError(f"target tokens must be codes in [0, {V}) or MASK ({cfg.mask_id})")
    if len(sampling.steps) != Q:
        raise ValueError(f"steps gives {len(sampling.steps)} levels ({list(sampling.steps)}), "
                         f"the model has {Q}: give one step count per level")


@torch.inference_mode()
def generate_tokens(model, context: torch.Tensor, conditions: torch.Tensor, sampling: SamplingConfig,
                    target: torch.Tensor | None = None,
                    progress: Callable[[int, int, int], None] | None = None) -> torch.Tensor:
    """context [C-1, Q, T] codes, conditions [S] ids -> target tokens [Q, T].

    ``model(tokens [R, C, Q, T], conditions [R, S], level=q)`` returns logits [R, T, V].
    ``target`` (optional) holds fixed codes and MASK where to generate (inpainting/continuation).
    ``progress(level, step, n_steps)`` is called after every step."""
    cfg: LMConfig = model.cfg
    dev = model.device
    context, conditions = context.to(dev, torch.int64), conditions.to(dev, torch.int64)
    check_request(context, conditions, target, cfg, sampling)
    Q, T = cfg.n_q, context.shape[-1]
    target = (torch.full((Q, T), cfg.mask_id, dtype=torch.int64, device=dev) if target is None
              else target.to(dev, torch.int64).clone())
    weights = torch.tensor(sampling.guidance_weights(), dtype=torch.float32, device=dev)
    for q in range(Q):
        n_steps = sampling.steps[q]
        masked = target[q] == cfg.mask_id
        n_masked = n_total = int(masked.sum())  # one host read per level
        for t in range(n_steps):
            n_keep = n_masked - masked_after_step(t, n_steps, n_total)
            if n_keep > 0:
                visible = target.clone()
                visible[q + 1:] = cfg.mask_id
                tokens, conds = guidance_rows(context, visible, conditions, sampling.guidance, cfg)
                logits = model(tokens, conds, level=q)
                tok, _, score = guide_sample_rank_ref(
                    logits, weights, seed=sampling.seed, level=q, step=t, masked=masked,
                    temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                    w_conf=sampling.w_confidence, w_causal=sampling.w_causal, w_rand=sampling.w_random)
                keep = score.topk(n_keep).indices
                target[q, keep] = tok[keep]
                masked[keep] = False
                n_masked -= n_keep
            if progress is not None:
                progress(q, t, n_steps)
    return target
