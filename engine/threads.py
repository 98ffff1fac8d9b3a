"""CPU threads sized to the cores other processes leave free.

On a 2-core machine with one other busy process, a step run with 2 threads is slower than with 1:
every parallel region (each GEMM, norm, elementwise op; ATen's and the C++ ops' share one OpenMP
runtime) ends at a barrier that waits for the thread the scheduler parked behind the other process,
a few milliseconds each time (measured here: a 1000 x 1024 LayerNorm 7.8 ms with 2 threads against
0.5 ms with 1, while another job ran). So while the engine steps it watches, from /proc, how many
cores the rest of the machine keeps busy (the machine's busy time minus this process's own), and
runs with the cores that are left, at least one; on a quiet machine that is all of them, as before.

``STEMGEN_THREADS=N`` fixes the count (no watching); ``auto`` (the default) watches. Processes at a
positive nice level (background training, say) do not count as busy: they yield to the engine.
Every step loop of a process shares one governor (``process_governor``): a new generation starts from
the last decision instead of measuring again, and the first decision is made after a short window
(0.2 s) rather than a whole interval, so a short generation on a busy machine does not run its first
second with a thread too many.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

import torch

log = logging.getLogger("stemgen")
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _count(var: str, default: str) -> int | None:
    text = os.environ.get(var, default).strip()
    if text == "auto":
        return None
    if not text.isdigit() or not 1 <= int(text) <= 1024:
        raise ValueError(f"{var}={text[:40]!r}: a thread count from 1 to 1024" + (", or auto" if default == "auto" else ""))
    return int(text)


def fixed_threads() -> int | None:
    """STEMGEN_THREADS as a thread count, None for 'auto' (unset); a bad value is one clear error."""
    return _count("STEMGEN_THREADS", "auto")


def codec_threads() -> int:
    """The CPU threads the codec runs with, whatever the step loop uses: STEMGEN_CODEC_THREADS, 1 by
    default. Fixed, because its convolutions and LSTM round differently with another thread count
    (a stem's audio would then depend on how busy the machine was, and the server's on a worker
    thread's count). 1 by default; measured on 2 cores of the Xeon with the demo codec, 18.8 s of audio:
    a process's first decode takes 0.6 s with 1 thread against 2.3 s with 2 (oneDNN sets up its
    kernels for 2 threads slowly), which is what a `stemgen generate` pays; later decodes 0.39-0.45 s
    against 0.33 s (a server's steady state, 2 threads ahead); with another process keeping a core
    busy 0.56 s against 1.21 s (oneDNN's LSTM steps one frame at a time; a parked thread stalls each)."""
    return _count("STEMGEN_CODEC_THREADS", "1")


@contextlib.contextmanager
def thread_count(n: int):
    """Run the block with this thread's torch (and OpenMP) thread count at ``n``, then restore it."""
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before != n:
            torch.set_num_threads(before)


def read_cpu() -> tuple[int, int, int] | None:
    """(busy ticks of un-niced work over all CPUs, total ticks over all CPUs, number of CPUs) from
    /proc/stat, or None where there is no /proc."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    head = lines[0].split()
    user, _nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in head[1:9])
    n = sum(1 for ln in lines if ln.startswith("cpu") and ln[3:4].isdigit())
    busy = user + system + irq + softirq + steal
    return busy, busy + _nice + idle + iowait, n


def read_self() -> int | None:
    """This process's CPU ticks (all its threads), or None."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])   # utime, stime


class ThreadGovernor:
    """Call ``update()`` once per step from each thread that runs steps: every ``interval`` seconds
    (the first time after ``first_interval``) it measures the cores other processes used since the
    last measurement and sets the calling thread's torch (and OpenMP) thread count to the cores
    left, at least one. Thread-safe."""

    def __init__(self, interval: float = 1.0, cpu=read_cpu, own=read_self, clock=time.monotonic,
                 usable: int | None = None, niced: bool | None = None, first_interval: float = 0.2):
        self.fixed = fixed_threads()
        self.interval, self.cpu, self.own, self.clock = interval, cpu, own, clock
        self.first_interval = min(first_interval, interval)
        self.decided = False   # a decision made from a measurement (before it: the threads torch had)
        self._lock = threading.Lock()
        if usable is None:
            usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.usable = usable
        self.last = None
        self.threads = self.fixed or torch.get_num_threads()
        self.others = 0.0   # cores the rest of the machine kept busy at the last measurement
        # a niced engine's own time is in /proc/stat's nice column, not in the busy time read here
        self.niced = (os.nice(0) > 0 if hasattr(os, "nice") else False) if niced is None else niced

    def update(self) -> int:
        if self.fixed is not None:
            if torch.get_num_threads() != self.fixed:
                torch.set_num_threads(self.fixed)
            return self.fixed
        with self._lock:
            threads = self._measure()
        if torch.get_num_threads() != threads:   # the calling thread's count (OpenMP's is per thread)
            torch.set_num_threads(threads)
        return threads

    def _measure(self) -> int:
        now = self.clock()
        wait = self.interval if self.decided else self.first_interval
        if self.last is not None and now - self.last[0] < wait:
            return self.threads
        cpu, own = self.cpu(), self.own()
        if cpu is None or own is None:
            return self.threads
        if self.last is not None:
            _, busy0, total0, own0 = self.last
            busy, total, n = cpu
            if total > total0:
                mine = 0 if self.niced else own - own0
                self.others = max(0.0, (busy - busy0 - mine) / (total - total0) * n)
                want = max(1, min(self.usable, round(n - self.others)))
                if want != self.threads:
                    log.info("CPU threads %d -> %d (other processes keep %.1f of %d cores busy)",
                             self.threads, want, self.others, n)
                    self.threads = want
                self.decided = True
        self.last = (now, cpu[0], cpu[1], own)
        return self.threads


_process: ThreadGovernor | None = None
_process_lock = threading.Lock()


def process_governor() -> ThreadGovernor:
    """The governor every step loop of this process shares (made on first use; made again if
    STEMGEN_THREADS has changed since)."""
    global _process
    with _process_lock:
        if _process is None or _process.fixed != fixed_threads():
            _process = ThreadGovernor()
        return _process
