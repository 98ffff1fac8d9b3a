"""The op benchmark file's Triton groups must not rot while no GPU runs them: they run here once each
on tiny shapes under the Triton interpreter (timings disabled, so nothing here is a speed figure)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the benchmark file runs for real (gpu_run.sh)")
def test_kernel_bench_file_runs_on_tiny_shapes():
    env = dict(os.environ, STEMGEN_BENCH_SMOKE="1", TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                          str(ROOT / "bench" / "test_ops_bench.py")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    collected = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                                str(ROOT / "bench" / "test_ops_bench.py")], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=600).stdout
    n = sum(1 for line in collected.splitlines() if "::" in line)
    assert n > 0 and f"{n} passed" in res.stdout and "skipped" not in res.stdout, res.stdout[-1000:]


def test_profile_step_script_runs():
    import importlib.util
    spec = importlib.util.spec_from_file_location("profile_step", ROOT / "bench" / "profile_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    report = mod.main(["--config", "tiny", "--device", "cpu", "--frames", "20", "--steps", "2", "--rows", "5"])
    assert "ms per step" in report and "aten::" in report
