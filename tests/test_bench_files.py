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


def test_attention_sweep_script_runs(tmp_path):
    """bench/attn_sweep.py (the GPU's choice of attention configuration) on a CPU: every option
    checked against the reference and reported, and the best written to its JSON."""
    import json

    out = tmp_path / "sweep.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "attn_sweep.py"), "--smoke", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "WRONG" not in res.stdout and "failed" not in res.stdout, res.stdout
    report = json.loads(out.read_text())
    tried = {c["config"] for c in report["configs"]}
    assert len(report["shapes"]) == 1 and len(tried) == 4 + 3   # every option, then the best three on the next tile
    assert {c.split(",stages=1,", 1)[1] for c in tried} == {
        "rope=kernel,split_tail=0,acc_in_dot=0,tma=0", "rope=q,split_tail=1,acc_in_dot=0,tma=1",
        "rope=fused,split_tail=0,acc_in_dot=1,tma=0", "rope=fused,split_tail=1,acc_in_dot=1,tma=1"}
    assert report["best"]["config"] in tried and report["best"]["config"] in res.stdout


def test_int8_fidelity_script(tmp_path):
    """bench/int8_fidelity.py on the tiny preset: figures per level and in all, errors small but not zero
    (int8 does move the logits; so does bf16 with --dtype bfloat16), and its comparison of a model with itself is exact."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("int8_fidelity", ROOT / "bench" / "int8_fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "fid.json"
    mod.main(["--config", "tiny", "--frames", "30", "--examples", "2", "--json", str(out)])
    levels = json.loads(out.read_text())["levels"]
    assert set(levels) == {"0", "1", "2", "3", "all"}
    assert all(0 < r["mean_error"] < 0.2 and 0 < r["max_error"] < 0.2 and 0.5 <= r["top1"] <= 1 for r in levels.values())
    mod.main(["--config", "tiny", "--frames", "30", "--examples", "2", "--dtype", "bfloat16", "--json", str(out)])
    bf16 = json.loads(out.read_text())
    assert bf16["dtype"] == "bfloat16" and all(0 < r["mean_error"] < 0.2 for r in bf16["levels"].values())
    assert bf16["levels"]["all"]["mean_error"] != levels["all"]["mean_error"]   # another model ran
    from stemgen.bench import build_models
    lm = build_models(None, "tiny", torch.device("cpu"), torch.float32, False, 0)[0]
    g = torch.Generator().manual_seed(1)
    cfg = lm.cfg
    rows = mod.step_rows(cfg, torch.randint(0, cfg.codebook_size, (cfg.n_channels - 1, cfg.n_q, 12), generator=g),
                         torch.zeros(len(cfg.cond_sizes), dtype=torch.int64),
                         torch.randint(0, cfg.codebook_size, (cfg.n_q, 12), generator=g), g)
    assert len(rows) == 2 * cfg.n_q and all(r[0].shape[0] == 3 for r in rows)
    same = mod.compare(lm, lm, rows, [3.0, 3.0, -5.0])["all"]
    assert same["max_error"] == 0 and same["top1"] == 1
    # the guided distributions: the model with its guidance fold against itself without it
    from stemgen import cpp_ext   # the fold is the C++ backend's choice: without the extension, the reference
    assert lm.ops.names["fold_guidance"].startswith("folded") == cpp_ext.available()
    assert 0 <= same["guided_tv_max"] < 1e-5
    assert all(0 < r["guided_tv_mean"] < 0.5 for r in bf16["levels"].values())
