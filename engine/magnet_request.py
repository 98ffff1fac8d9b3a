"""A MAGNeT generation request: MAGNeT's decoding (audiocraft 1.3.0 ``MagnetLMModel._generate_stage``;
SPEC section 9) as a policy of the engine's request, so the same scheduler and runner batch it with
other requests (one packed forward per step, continuous batching, the frame budget).

Per level s (levels < s fixed and visible, levels > s MASK except given frames), step t of S:
  mask ratio p = cos(pi/2 * linspace(0, 1, S)[t]); n = max(int(p * N), 1) units stay masked, N = units
  to generate; units are spans of ``span_len`` frames ('nonoverlap': the chunks with the highest score
  1 - max prob of their frames are masked; a chunk that survives a step is final) or frames
  ('stride1': overlapping spans of least probable frames, -log prob, found by audiocraft's binary
  search, here over a precomputed coverage table instead of one mask per probe);
  CFG coefficient p * max_cfg_coef + (1 - p) * min_cfg_coef; temperature annealed linearly to 0
  (temperature * (S - 1 - t) / S, floored at 1e-2); sampling by kernels.magnet_sampling.

Generalisations of audiocraft's loop, identical where it is defined: any frames of the target may be
given (a prompt at the start is audiocraft's continuation; given frames anywhere are inpainting) and
stay fixed in every level; a chunk with at least one free frame is generated (its given frames kept),
a chunk of given frames only is fixed. audiocraft trims a 'nonoverlap' sequence to a multiple of
span_len (500 frames -> 498); here the last chunk is shorter and every frame is generated, so the
decisions equal audiocraft's when the length is a multiple of span_len.
"""
from __future__ import annotations

import bisect
import itertools
import math
from typing import Callable

import torch

from .config import MagnetConfig, SamplingConfig, check_guidance
from .errors import RequestError
from .magnet import TextMemory, TextRows
from .request import _codes, call_progress, check_steps

DONT_REMASK = -1e4   # audiocraft's DONT_REMASK_ME_SCORE
_ids = itertools.count()


def step_schedule(S: int) -> list[float]:
    """audiocraft's mask ratio per step: cos(pi/2 * linspace(0, 1, S)) in fp32."""
    return torch.cos(torch.linspace(0, 1, S) * math.pi * 0.5).tolist()


def least_probable_spans(scores: torch.Tensor, n_target: int, span: int) -> torch.Tensor:
    """audiocraft's ``_least_probable_span_masking`` on one sequence: bool [T], the union of the u most
    improbable overlapping spans (span scores = sums of ``scores``), u found by its binary search.
    The union size of the first u spans is read from a coverage table (each frame's first covering
    span rank), so each probe is a count, not a new mask."""
    T = scores.shape[0]
    if T < span:
        return torch.ones(T, dtype=torch.bool, device=scores.device)
    order = torch.argsort(scores.unfold(0, span, 1).sum(dim=-1), descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.shape[0], device=order.device)
    first = torch.full((T,), T + 1, dtype=torch.int64, device=scores.device)   # first covering span's rank
    for o in range(span):
        first[o: o + rank.shape[0]] = torch.minimum(first[o: o + rank.shape[0]], rank)
    covered = torch.sort(first).values.tolist()                          # one host read per step
    size = lambda u: bisect.bisect_left(covered, u)                      # frames covered by the first u spans  # noqa: E731
    n_target = max(n_target, span)
    lo, hi = n_target // span, n_target - span + 1
    mid = round(0.5 * (lo + hi))
    last = mid
    if not (mid == lo or mid == hi):
        while lo < mid < hi:
            last = mid
            if size(mid) > n_target:
                hi = mid
            else:
                lo = mid
            mid = round(0.5 * (lo + hi))
    return first < last


class MagnetRequest:
    """One text-conditioned MAGNeT generation of ``length`` frames: text memory (engine.magnet;
    None: unconditioned), sampling settings (guidance "magnet"), optional partial target [Q, T]
    (MASK where to generate; given codes stay fixed)."""

    def __init__(self, cfg: MagnetConfig, text: TextMemory | None, sampling: SamplingConfig, length: int | None = None,
                 target: torch.Tensor | None = None, progress: Callable[[int, int, int], None] | None = None):
        if not isinstance(sampling, SamplingConfig):
            raise RequestError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        if progress is not None and not callable(progress):
            raise RequestError("progress must be callable (level, step, steps_in_level)")
        check_guidance(sampling.guidance, "magnet")
        check_steps(sampling.steps, cfg.n_q)
        Q = cfg.n_q
        if target is not None:
            target = _codes(target, "target")
            if target.dim() != 2 or target.shape[0] != Q or target.shape[1] < 1:
                raise RequestError(f"target tokens must have shape [{Q}, T], got {list(target.shape)}")
            if length is not None and target.shape[1] != length:
                raise RequestError(f"target has {target.shape[1]} frames but length is {length}")
            if ((target < 0) | (target > cfg.mask_id)).any():
                raise RequestError(f"target tokens must be codes in [0, {cfg.codebook_size}) or MASK ({cfg.mask_id})")
            length = target.shape[1]
        if length is None or length < 1:
            raise RequestError("a MAGNeT request needs a length in frames >= 1 (or a target)")
        self.id = next(_ids)
        self.cfg, self.sampling, self.progress, self.text = cfg, sampling, progress, text
        self.given, self.T = target, int(length)
        self.n_rows = 2 if text is not None else 1   # conditioned + unconditioned rows; one without text
        self.cancelled = False
        self.error: BaseException | None = None
        self.tokens: torch.Tensor | None = None
        self.notify = call_progress
        self.chunked = cfg.span_len > 1 and sampling.span_arrangement == "nonoverlap"

    @property
    def frames(self) -> int:
        return self.n_rows * self.T

    def admit(self, device: torch.device) -> None:
        cfg, T = self.cfg, self.T
        if self.given is None:
            self.given = torch.full((cfg.n_q, T), cfg.mask_id, dtype=torch.int64)
        self.given = self.given.to(device)
        self.tokens = self.given.clone()
        self.arange = torch.arange(T, device=device)
        self.chunk_of = self.arange // cfg.span_len
        self.level, self.step = 0, 0
        self._start_level()

    @property
    def done(self) -> bool:
        return self.level >= self.cfg.n_q

    @property
    def finished(self) -> bool:
        return self.done or self.cancelled or self.error is not None

    def _start_level(self) -> None:
        while not self.done:
            self.free = self.given[self.level] == self.cfg.mask_id       # frames this level generates
            if self.chunked:
                n_chunks = -(-self.T // self.cfg.span_len)
                free_chunks = torch.zeros(n_chunks, dtype=torch.bool, device=self.free.device)
                free_chunks.index_fill_(0, self.chunk_of[self.free], True)
                units = free_chunks
            else:
                units = self.free
            self.scores = torch.where(units, 0.0, DONT_REMASK).float()
            self.n_units = int(units.sum())                             # one host read per level
            if self.n_units:
                self.schedule = step_schedule(self.sampling.steps[self.level])
                self._mask()
                return
            self.level += 1   # nothing to generate at this level: its frames are all given

    def _mask(self) -> None:
        """audiocraft's masking at the start of step ``self.step``."""
        cfg, seq = self.cfg, self.tokens[self.level]
        n = max(int(torch.tensor(self.schedule[self.step], dtype=torch.float32).mul(self.n_units).item()), 1)
        if self.chunked:
            chunks = torch.zeros_like(self.scores, dtype=torch.bool)
            chunks[self.scores.topk(min(n, self.scores.shape[0])).indices] = True
            self.chunks = chunks
            seq[chunks[self.chunk_of]] = cfg.mask_id
        elif cfg.span_len > 1:
            seq[least_probable_spans(self.scores, n, cfg.span_len)] = cfg.mask_id
        else:
            seq[self.scores.topk(min(n, self.T)).indices] = cfg.mask_id
        seq[~self.free] = self.given[self.level][~self.free]               # given frames stay
        self.masked = seq == cfg.mask_id

    def skip_idle_steps(self) -> None:
        """Every MAGNeT step runs a forward (levels with nothing to generate were skipped)."""

    def _positions(self) -> torch.Tensor:
        """Frames whose sampled probability this step needs: every frame of a masked chunk (a
        chunk's score is over all its frames, as audiocraft's), else the masked frames."""
        return (self.chunks[self.chunk_of] if self.chunked else self.masked).nonzero()[:, 0]

    def rows(self, subset: bool):
        S = self.n_rows
        tokens = self.tokens.expand(S, 1, *self.tokens.shape)
        window = self.cfg.band if self.level > 0 else None
        cond = TextRows(self.text, 1 if self.text is not None else 0, window)
        self._pos = self._positions() if subset else self.arange
        return tokens, cond, self.level, self._pos if subset else None

    def _coef(self) -> float:
        """The CFG coefficient, annealed with the mask ratio as audiocraft."""
        s, p = self.sampling, self.schedule[self.step]
        return p * s.max_cfg_coef + (1 - p) * s.min_cfg_coef

    def guidance(self) -> list[float] | None:
        """This step's row weights: uncond + (cond - uncond) * coef = coef * cond + (1 - coef) * uncond."""
        if self.n_rows != 2:
            return None
        coef = self._coef()
        return [coef, 1.0 - coef]

    def sample(self, ops, logits: torch.Tensor):
        """``logits`` [2, M, V] (conditioned, unconditioned), or [1, M, V]: guided already (folded
        before the head, kernels.guidance_fold) or without text."""
        s = self.sampling
        S = s.steps[self.level]
        temperature = max(s.temperature * (S - 1 - self.step) / S, 1e-2)   # annealed linearly, as audiocraft
        return ops.magnet_sample(logits, self._pos, seed=s.seed, level=self.level, step=self.step, coef=self._coef(),
                                 temperature=temperature, top_k=s.top_k, top_p=s.top_p)

    def commit(self, tok: torch.Tensor, prob: torch.Tensor) -> None:
        pos, level = self._pos, self.level
        place = self.masked[pos]
        self.tokens[level, pos[place]] = tok[place]
        if self.chunked:
            best = torch.full_like(self.scores, -math.inf).scatter_reduce(0, self.chunk_of[pos], prob, "amax")
            self.scores = torch.where(self.chunks, 1 - best, DONT_REMASK)
        else:
            scores = torch.full_like(self.scores, DONT_REMASK)
            scores[pos[place]] = -torch.log(prob[place])
            self.scores = scores
        self._advance()

    def _advance(self) -> None:
        if self.progress is not None:
            self.notify(self, self.progress, (self.level, self.step, self.sampling.steps[self.level]))
        self.step += 1
        if self.step >= self.sampling.steps[self.level]:
            self.level, self.step = self.level + 1, 0
            self._start_level()
        else:
            self._mask()
