"""Batched CFG scheduling: which requests run in the next step. Requests differ in duration,
instrument, guidance, steps per level, seed and progress; they join and leave between steps
(continuous batching) under a max-frames-per-step budget. The scheduler imports no model: the
runner (engine.runner) executes the step it plans.
"""
from __future__ import annotations

from collections import deque

import torch

from .request import Request


class Scheduler:
    """Admits waiting requests under the frame budget, plans each step's active requests and
    retires finished, cancelled and failed ones."""

    def __init__(self, device: torch.device | str = "cpu", max_frames: int = 1 << 15):
        self.device = torch.device(device)
        self.max_frames = max_frames
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def submit(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self) -> list[Request]:
        """Move waiting requests into the batch while the frame budget allows (a request larger
        than the budget runs alone). Returns requests cancelled while waiting, and those whose
        admission failed (``error`` set: that request fails alone, the others run on)."""
        dropped = []
        used = sum(r.frames for r in self.running)
        while self.waiting and (not self.running or used + self.waiting[0].frames <= self.max_frames):
            req = self.waiting.popleft()
            if req.cancelled:
                dropped.append(req)
                continue
            try:
                req.admit(self.device)
            except Exception as e:  # noqa: BLE001 - one request's bad state must not stop the batch
                req.error = req.error or e
                dropped.append(req)
                continue
            self.running.append(req)
            used += req.frames
        return dropped

    def plan(self) -> list[Request]:
        """The running requests that need a forward this step (idle schedule steps skipped)."""
        for r in self.running:
            r.skip_idle_steps()
        return [r for r in self.running if not r.finished]

    def retire(self) -> list[Request]:
        left = [r for r in self.running if r.finished]
        self.running = [r for r in self.running if not r.finished]
        return left

    def drop_all(self) -> list[Request]:
        """Remove every queued and running request (after a failed step)."""
        left = self.running + list(self.waiting)
        self.running, self.waiting = [], deque()
        return left
