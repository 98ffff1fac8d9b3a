"""engine.memory: a CPU engine keeps glibc from unmapping its large step buffers between steps."""
import ctypes

import pytest
import torch

from stemgen.engine import memory


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]


def mapped_bytes():
    """Bytes glibc holds in mmapped blocks now (mallinfo2().hblkhd); None without glibc's mallinfo2."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = MallInfo2
    return fn().hblkhd


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(memory, "_state", None)
    return monkeypatch


def test_bad_value_is_one_clear_error(fresh):
    fresh.setenv("STEMGEN_MALLOC", "fast")
    with pytest.raises(ValueError, match="STEMGEN_MALLOC='fast'.*'keep'.*'system'"):
        memory.keep_freed_memory()
    assert "not valid" in memory.status()


def test_system_leaves_the_allocator_alone(fresh):
    calls = []
    fresh.setattr(memory, "_mallopt", lambda: (lambda *a: calls.append(a) or 1))
    fresh.setenv("STEMGEN_MALLOC", "system")
    assert "STEMGEN_MALLOC=system" in memory.keep_freed_memory()
    assert calls == []


def test_keep_sets_both_thresholds_once(fresh):
    calls = []
    fresh.setattr(memory, "_mallopt", lambda: (lambda *a: calls.append(a) or 1))
    fresh.delenv("STEMGEN_MALLOC", raising=False)
    first = memory.keep_freed_memory()
    assert "keeps freed blocks" in first and memory.keep_freed_memory() == first
    assert sorted(calls) == sorted([(memory.M_MMAP_THRESHOLD, memory.MMAP_THRESHOLD),
                                    (memory.M_TRIM_THRESHOLD, memory.TRIM_THRESHOLD)])


def test_an_older_glibc_gets_its_largest_mmap_threshold(fresh):
    """An older glibc refuses an mmap threshold above 32 MiB: 32 MiB then, and the trim threshold is set
    all the same; what was applied is what is said."""
    calls = []

    def mallopt(param, value):
        calls.append((param, value))
        return 0 if (param, value) == (memory.M_MMAP_THRESHOLD, memory.MMAP_THRESHOLD) else 1
    fresh.setattr(memory, "_mallopt", lambda: mallopt)
    fresh.delenv("STEMGEN_MALLOC", raising=False)
    state = memory.keep_freed_memory()
    assert "mmap threshold 32 MiB" in state and "trim threshold 512 MiB" in state
    assert (memory.M_MMAP_THRESHOLD, memory.MMAP_THRESHOLD_OLD_GLIBC) in calls
    assert (memory.M_TRIM_THRESHOLD, memory.TRIM_THRESHOLD) in calls


def test_a_refused_mallopt_is_said(fresh):
    fresh.setattr(memory, "_mallopt", lambda: (lambda *a: 0))
    fresh.delenv("STEMGEN_MALLOC", raising=False)
    assert "refused" in memory.keep_freed_memory()


def test_no_mallopt_is_said(fresh):
    fresh.setattr(memory, "_mallopt", lambda: None)
    fresh.delenv("STEMGEN_MALLOC", raising=False)
    assert "not glibc" in memory.keep_freed_memory()


def test_a_cpu_step_loop_applies_it_and_large_buffers_leave_mmap(fresh, tmp_path):
    """The real allocator: after a CPU StepLoop exists, a 32 MB buffer comes from the heap (no new
    mapping) instead of a fresh mmap, as it would under glibc's defaults."""
    if mapped_bytes() is None:
        pytest.skip("needs glibc's mallinfo2 to observe the allocator")
    from helpers import load_engine_lm, tiny_model_dir
    from stemgen.engine.runner import StepLoop
    fresh.delenv("STEMGEN_MALLOC", raising=False)
    StepLoop(load_engine_lm(tiny_model_dir(tmp_path)))
    assert memory._state is not None and "keeps freed blocks" in memory._state
    if "mmap threshold 256 MiB" not in memory._state:
        pytest.skip(f"this glibc took a lower mmap threshold ({memory._state}): a buffer below it could "
                    "come from the heap under glibc's dynamic defaults too, so the check could not fail")
    before = mapped_bytes()
    x = torch.empty(8 << 20, dtype=torch.float32)   # 32 MB, above glibc's default dynamic limit too
    x.fill_(1.0)
    assert mapped_bytes() == before
    del x
