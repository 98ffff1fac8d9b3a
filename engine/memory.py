"""CPU memory: keep glibc malloc from handing a step's large buffers back to the kernel.

A CPU step allocates and frees the same large activations (megabytes each) in every layer. glibc
serves a block above its mmap threshold with a fresh mapping and returns the heap's free top to the
kernel above its trim threshold, so the next step's buffer of the same size starts as untouched
pages: a page fault and a page of zeroing per 4 KiB on first write. Measured on the small preset's
int8 path (batch 1, 500 frames, 2 cores): writing the dequantized gate|up product (1500 x 1536 fp32,
9 MB) took 6.9 ms, 2.8 ms with the memory kept, and a whole step 110 ms against 71.

So a CPU engine raises both thresholds once, process-wide (``mallopt``): blocks up to 256 MiB come
from the heap and up to 512 MiB of freed heap stay mapped for the next step. The process keeps, at
most, about its peak working set. An older glibc (2.34, say) refuses an mmap threshold above 32 MiB: then
32 MiB (the small and paper presets' step buffers are below it). The heap of a thread other than
the main one (the service's scheduler thread) is capped at 64 MiB by glibc whatever the threshold,
so a larger block there is still mapped afresh. ``STEMGEN_MALLOC=system`` leaves glibc's defaults
(and its dynamic thresholds) alone; a C library without glibc's ``mallopt`` is left alone, said so
by ``stemgen info``.
"""
from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("stemgen")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 256 << 20
MMAP_THRESHOLD_OLD_GLIBC = 32 << 20    # the largest an older glibc (2.34) accepts on 64-bit: HEAP_MAX_SIZE / 2
TRIM_THRESHOLD = 512 << 20

_state: str | None = None


def _mallopt():
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):   # TypeError: no CDLL(None) (Windows)
        return None


def keep_freed_memory() -> str:
    """Apply the thresholds once (idempotent); returns what is in effect, as `stemgen info` shows it."""
    global _state
    if _state is not None:
        return _state
    choice = os.environ.get("STEMGEN_MALLOC", "keep").strip().lower()
    if choice not in ("keep", "system"):
        raise ValueError(f"STEMGEN_MALLOC={choice!r}: 'keep' (the default) or 'system'")
    mallopt = _mallopt() if choice == "keep" else None
    if choice == "system":
        _state = "the C library's defaults (STEMGEN_MALLOC=system)"
    elif mallopt is None:
        _state = "the C library's defaults (no mallopt: not glibc)"
    else:
        mmap = next((v for v in (MMAP_THRESHOLD, MMAP_THRESHOLD_OLD_GLIBC) if mallopt(M_MMAP_THRESHOLD, v) == 1), None)
        trim = TRIM_THRESHOLD if mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 else None
        if mmap is None and trim is None:
            _state = "the C library's defaults (mallopt refused the thresholds)"
        else:
            mmap_said, trim_said = (f"{v >> 20} MiB" if v else "refused: the C library's" for v in (mmap, trim))
            _state = (f"glibc malloc keeps freed blocks (mmap threshold {mmap_said}, trim threshold "
                      f"{trim_said}; STEMGEN_MALLOC=system to leave it)")
    log.debug("CPU memory: %s", _state)
    return _state


def status() -> str:
    """What a CPU engine uses (or would), without applying it."""
    if _state is not None:
        return _state
    choice = os.environ.get("STEMGEN_MALLOC", "keep").strip().lower()
    if choice == "system":
        return "the C library's defaults (STEMGEN_MALLOC=system)"
    if choice != "keep":
        return f"STEMGEN_MALLOC={choice!r} is not valid: 'keep' (the default) or 'system'"
    return ("glibc malloc keeps freed blocks once a CPU engine steps (STEMGEN_MALLOC=system to leave it)"
            if _mallopt() is not None else "the C library's defaults (no mallopt: not glibc)")
