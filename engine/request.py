"""One generation request: its state (tokens, level, step), validation, guidance rows and the
unmasking schedule (SPEC section 4). It knows nothing of models or batches: the scheduler admits
and retires requests, the runner executes their steps."""
from __future__ import annotations

import itertools
import math
from typing import Callable

import torch

from .config import LMConfig, SamplingConfig, check_guidance
from .errors import RequestError


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


def check_steps(steps, n_q: int) -> None:
    """The one check of a step schedule against the model's levels."""
    if len(steps) != n_q:
        raise RequestError(f"steps gives {len(steps)} levels ({list(steps)}), the model has {n_q}: give one "
                           "step count per level, e.g. --steps " + ",".join(["8"] * n_q))


def check_request(context: torch.Tensor, conditions: torch.Tensor, target: torch.Tensor | None,
                  cfg: LMConfig, sampling: SamplingConfig) -> None:
    check_guidance(sampling.guidance, "stemgen")
    C, Q, V = cfg.n_channels, cfg.n_q, cfg.codebook_size
    if context.dim() != 3 or context.shape[0] != C - 1 or context.shape[1] != Q:
        raise RequestError(f"context tokens must have shape [{C - 1}, {Q}, T] (context channels, levels, "
                         f"frames), got {list(context.shape)}")
    T = context.shape[-1]
    if T < 1:
        raise RequestError("context has no frames (T = 0)")
    if context.numel() and ((context < 0) | ((context >= V) & (context != cfg.null_id))).any():
        raise RequestError(f"context tokens must be codes in [0, {V}) or NULL ({cfg.null_id})")
    if conditions.shape != (len(cfg.cond_sizes),):
        raise RequestError(f"conditions must have shape [{len(cfg.cond_sizes)}], got {list(conditions.shape)}")
    for s, n in enumerate(cfg.cond_sizes):
        if not 0 <= int(conditions[s]) <= n:
            raise RequestError(f"condition {s} is {int(conditions[s])}, expected 0..{n - 1} (or NULL = {n})")
    if target is not None:
        if tuple(target.shape) != (Q, T):
            raise RequestError(f"target tokens must have shape [{Q}, {T}], got {list(target.shape)}")
        if ((target < 0) | (target > cfg.mask_id)).any():
            raise RequestError(f"target tokens must be codes in [0, {V}) or MASK ({cfg.mask_id})")
    check_steps(sampling.steps, Q)


_ids = itertools.count()


def _codes(x, what: str) -> torch.Tensor:
    """Integer codes as int64; floats, bools and non-tensors are refused, never truncated."""
    try:
        t = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError):
        raise RequestError(f"{what} must be an integer tensor of codes, got {type(x).__name__}") from None
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise RequestError(f"{what} must hold integer codes, got dtype {t.dtype}")
    return t.to(torch.int64)


def call_progress(request: "Request", fn, args) -> None:
    """Run a progress callback in this thread; whatever it raises (SystemExit and
    KeyboardInterrupt included) fails its own request only."""
    try:
        fn(*args)
    except BaseException as e:  # noqa: BLE001 - a callback must not stop the scheduler
        if request.error is None:
            request.error = RequestError(f"the progress callback raised {type(e).__name__}: {e}")
            request.error.__cause__ = e


class Request:
    """One generation: context codes [C-1, Q, T], conditions [S], sampling settings, optional
    partial target [Q, T] (MASK where to generate). Validated on construction."""

    def __init__(self, cfg: LMConfig, context: torch.Tensor, conditions: torch.Tensor, sampling: SamplingConfig,
                 target: torch.Tensor | None = None,
                 progress: Callable[[int, int, int], None] | None = None):
        context, conditions = _codes(context, "context"), _codes(conditions, "conditions")
        target = None if target is None else _codes(target, "target")
        if not isinstance(sampling, SamplingConfig):
            raise RequestError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        if progress is not None and not callable(progress):
            raise RequestError("progress must be callable (level, step, steps_in_level)")
        check_request(context, conditions, target, cfg, sampling)
        self.id = next(_ids)
        self.cfg, self.sampling, self.progress = cfg, sampling, progress
        self.context, self.conditions, self.given = context, conditions, target
        self.T = context.shape[-1]
        self.n_rows = len(sampling.guidance_weights())
        self.cancelled = False
        self.error: BaseException | None = None   # set if this request failed (e.g. its callback raised)
        self.tokens: torch.Tensor | None = None   # [Q, T] state, on the model's device once admitted
        self.notify = call_progress                 # how progress callbacks run (the service: off-thread)

    @property
    def frames(self) -> int:
        """Sequence elements this request adds to each forward (rows x frames)."""
        return self.n_rows * self.T

    def admit(self, device: torch.device) -> None:
        cfg, Q, T = self.cfg, self.cfg.n_q, self.T
        self.context = self.context.to(device)
        self.conditions = self.conditions.to(device)
        self.weights = torch.tensor(self.sampling.guidance_weights(), dtype=torch.float32, device=device)
        self.one = torch.ones(1, dtype=torch.float32, device=device)   # the weight of folded rows
        if self.given is None:
            self.tokens = torch.full((Q, T), cfg.mask_id, dtype=torch.int64, device=device)
            self.level_totals = [T] * Q
        else:
            self.tokens = self.given.to(device).clone()
            self.level_totals = (self.tokens == cfg.mask_id).sum(dim=1).tolist()  # one host read
        # the guidance rows' context channels and conditions never change: build them once
        rows, self.cond_rows = guidance_rows(self.context, self.tokens, self.conditions, self.sampling.guidance, cfg)
        self.context_rows = rows[:, :-1]
        self.arange = torch.arange(T, device=device)
        self.level, self.step = 0, 0
        self._start_level()

    def _start_level(self):
        self.n_masked = self.level_totals[self.level] if self.level < self.cfg.n_q else 0
        if self.level < self.cfg.n_q:
            self.masked = self.tokens[self.level] == self.cfg.mask_id

    @property
    def done(self) -> bool:
        return self.level >= self.cfg.n_q

    def n_keep(self) -> int:
        """Positions this step must fix, per the schedule."""
        S = self.sampling.steps[self.level]
        return self.n_masked - masked_after_step(self.step, S, self.level_totals[self.level])

    @property
    def finished(self) -> bool:
        """Leaves the batch: done, cancelled or failed."""
        return self.done or self.cancelled or self.error is not None

    def advance(self) -> None:
        if self.progress is not None:
            self.notify(self, self.progress, (self.level, self.step, self.sampling.steps[self.level]))
        self.step += 1
        if self.step >= self.sampling.steps[self.level]:
            self.level, self.step = self.level + 1, 0
            if not self.done:
                self._start_level()

    def skip_idle_steps(self) -> None:
        """Steps whose schedule fixes nothing need no forward."""
        while not self.finished and self.n_keep() <= 0:
            self.advance()

    def rows(self, subset: bool):
        """This step's model input: (tokens [R, C, Q, T], conditions [R, S], level, positions)."""
        visible = self.tokens.clone()
        visible[self.level + 1:].fill_(self.cfg.mask_id)
        R = self.context_rows.shape[0]
        tokens = torch.cat([self.context_rows, visible.expand(R, 1, *visible.shape)], dim=1)
        self._positions = self.masked.nonzero()[:, 0] if subset else self.arange
        return tokens, self.cond_rows, self.level, self._positions if subset else None

    def guidance(self) -> list[float]:
        """The guidance weights of this step's rows (kernels.guidance_fold may fold them before the head)."""
        return self.sampling.guidance_weights()

    def sample_args(self, rows: int | None = None) -> tuple[tuple, dict]:
        """The sampling op's arguments for this step's logits of ``rows`` rows (see kernels.sampling):
        one row where the guidance rows were folded before the head takes weight 1."""
        s, pos = self.sampling, self._positions
        weights = self.one if rows == 1 else self.weights
        return ((weights, pos, self.masked[pos], self.T),
                dict(seed=s.seed, level=self.level, step=self.step, temperature=s.temperature, top_k=s.top_k,
                     top_p=s.top_p, w_confidence=s.w_confidence, w_causal=s.w_causal, w_random=s.w_random))

    def sample(self, ops, logits: torch.Tensor):
        """This step's guidance + sampling + rank score -> what commit takes."""
        args, kwargs = self.sample_args(logits.shape[0])
        tok, _, score = ops.guide_sample_rank(logits, *args, **kwargs)
        return tok, score

    def commit(self, tok: torch.Tensor, score: torch.Tensor) -> None:
        """Keep the best-ranked candidates (as many as the schedule fixes this step), then advance."""
        q, pos = self.level, self._positions
        n_keep = self.n_keep()
        keep = score.topk(n_keep).indices
        frames = pos[keep]
        self.tokens[q, frames] = tok[keep]
        self.masked.index_fill_(0, frames, False)  # no host scalar -> device copy
        self.n_masked -= n_keep
        self.advance()
