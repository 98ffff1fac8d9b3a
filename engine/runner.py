"""The runner executes a planned step: it owns the LM, its CUDA graphs and the sampling op.

    scheduler.admit(); active = scheduler.plan()      # engine.scheduler: which requests
    runner.execute(active)                            # one packed forward, then each one's sampling
    left = scheduler.retire()

``StepLoop`` ties the two together for callers that run a batch to completion in their own thread
(``run_requests``); the service (engine.service) runs the same loop on its worker thread.
A request's tokens depend only on its own inputs and seed: the noise is counter-based, attention
never mixes requests, and CPU GEMMs are kept in one kernel regime (engine.model.linear).
"""
from __future__ import annotations

import os

from .request import Request
from .scheduler import Scheduler
from .memory import keep_freed_memory
from .threads import process_governor


def cpu_chunk_rows(ffn_hidden: int) -> int:
    """Rows (frames x guidance rows) per forward on the CPU: a larger batch runs in chunks of whole
    requests, so each forward's widest activation (the feed-forward's gate|up, 2 x ffn_hidden fp32
    per row) stays within CPU_CHUNK_BYTES, near the last-level cache, and a batch runs about as fast
    per frame as one request. Measured (2-core EPYC, 32 MB L3, small preset, batch 8 x 500 frames x 3
    rows): 1,786 frames/s at 1,536-6,144 rows per forward, 1,395 at 12,288, 1,353 in one forward.
    STEMGEN_CPU_CHUNK_ROWS overrides (0 = one forward for the whole batch)."""
    text = os.environ.get("STEMGEN_CPU_CHUNK_ROWS")
    if text is None:
        return max(256, CPU_CHUNK_BYTES // (2 * ffn_hidden * 4))
    if not text.isdigit():
        raise ValueError(f"STEMGEN_CPU_CHUNK_ROWS={text!r}: a whole number of rows (0 = no chunking)")
    return int(text)


CPU_CHUNK_BYTES = 24 << 20


def chunks(sizes: list[int], limit: int) -> list[list[int]]:
    """Indices of requests of ``sizes`` rows, in order, grouped so each group's rows total <= limit
    (a request larger than the limit runs alone); limit 0: one group."""
    if not limit:
        return [list(range(len(sizes)))]
    out, rows = [[]], 0
    for i, n in enumerate(sizes):
        if out[-1] and rows + n > limit:
            out.append([])
            rows = 0
        out[-1].append(i)
        rows += n
    return out


class Runner:
    def __init__(self, model, head_subset: bool | None = None, graphs=None, chunk_rows: int | None = None):
        self.model = model
        self.graphs = graphs   # engine.graphs.TrunkGraphs, or None (eager trunk)
        # compute the head only at still-masked frames: saves GEMM rows on the CPU, but finding
        # them (nonzero) is a host sync on a GPU, so by default only on the CPU
        self.head_subset = model.device.type == "cpu" if head_subset is None else head_subset
        # on the CPU a large batch runs in chunks of requests (cpu_chunk_rows); on a GPU one forward
        on_cpu = model.device.type == "cpu" and graphs is None
        self.chunk_rows = (cpu_chunk_rows(model.cfg.ffn_hidden) if on_cpu else 0) if chunk_rows is None else chunk_rows

    @property
    def device(self):
        return self.model.device

    def execute(self, active: list[Request]) -> None:
        """The active requests' guidance rows through the LM (one packed forward, or a few on the
        CPU: see cpu_chunk_rows), then each one's guidance + sampling + ranking; a failure in one
        request's sampling fails that request alone."""
        if not active:
            return
        inputs = [r.rows(self.head_subset) for r in active]
        sizes = [t.shape[0] * t.shape[-1] for t, _, _, _ in inputs]
        for group in chunks(sizes, self.chunk_rows):
            part = [inputs[i] for i in group]
            guidance = [active[i].guidance() for i in group]   # the head may run on their weighted sum
            if self.graphs is None:
                logits = self.model.forward_requests(part, guidance)
            else:
                logits = self.model.level_logits(part, self.graphs.hidden([(t, c) for t, c, _, _ in part]), guidance)
            self._sample([active[i] for i in group], logits)

    def _sample(self, requests: list[Request], logits: list) -> None:
        """Each request's own decoding policy (StemGen's ranking, MAGNeT's spans) on its logits."""
        for r, lg in zip(requests, logits):
            try:
                r.commit(*r.sample(self.model.ops, lg))
            except Exception as e:  # noqa: BLE001 - one request's failure is its own
                r.error = e


class StepLoop:
    """A scheduler and a runner stepping together (admit, plan, execute, retire)."""

    def __init__(self, model_or_runner, max_frames: int = 1 << 15, head_subset: bool | None = None):
        self.runner = model_or_runner if isinstance(model_or_runner, Runner) else Runner(model_or_runner, head_subset)
        self.scheduler = Scheduler(self.runner.device, max_frames)
        # on the CPU: threads sized to the cores other processes leave free (engine.threads)
        self.governor = process_governor() if self.runner.device.type == "cpu" else None
        if self.governor is not None:   # large step buffers kept mapped between steps (engine.memory)
            keep_freed_memory()

    def submit(self, request: Request) -> None:
        self.scheduler.submit(request)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def running(self) -> list[Request]:
        return self.scheduler.running

    @property
    def waiting(self):
        return self.scheduler.waiting

    def step(self) -> list[Request]:
        """Run one step; returns the requests that left the batch (``finished`` is true)."""
        if self.governor is not None:
            self.governor.update()
        left = self.scheduler.admit()
        self.runner.execute(self.scheduler.plan())
        return left + self.scheduler.retire()

    def run(self) -> None:
        while self.has_work:
            self.step()


def run_requests(model_or_runner, requests: list[Request], max_frames: int = 1 << 15) -> list:
    """Run requests to completion as one batch, in this thread -> each one's codes [Q, T]. The first
    failed request's error is raised (a callback's error included)."""
    loop = StepLoop(model_or_runner, max_frames=max_frames)
    for r in requests:
        loop.submit(r)
    loop.run()
    for r in requests:
        if r.error is not None:
            raise r.error
    return [r.tokens for r in requests]
