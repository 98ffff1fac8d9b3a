"""`stemgen bench`: runs engine and baseline in one process and reports the ratio; on a converted
model in fp32 on the reference ops (MKL's GEMMs, as the training form's) the engine's tokens equal the
training-form baseline's."""
import json

import torch

import pytest

from typer.testing import CliRunner

from stemgen.cli import app
from stemgen.train import StemGenConfig

from helpers import make_model_dir

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """`stemgen bench` on the tiny preset at batches 1 and 2 -> (JSON path, result)."""
    out = tmp_path_factory.mktemp("bench") / "gen.json"
    res = runner.invoke(app, ["bench", "--config", "tiny", "--duration", "1", "--steps", "2,1,1,1", "--batch", "1,2",
                              "--device", "cpu", "--json", str(out)])
    assert res.exit_code == 0, res.output
    return out, res


def test_bench_preset_json(tiny_bench):
    out, res = tiny_bench
    rep = json.loads(out.read_text())
    assert rep["machine"]["torch"] and rep["settings"]["frames"] == 50
    for r in rep["results"]:
        for k in ("step_latency_ms", "transformer_passes_per_s", "frames_per_s", "audio_s_per_wall_s", "peak_mb"):
            assert r["engine"][k] > 0 and r["baseline"][k] > 0
        # the ratio is the two measured walls' (same frames on both sides), not a free number
        assert r["speedup_frames_per_s"] == pytest.approx(r["baseline"]["wall_s"] / r["engine"]["wall_s"], rel=1e-9)
        assert r["engine"]["frames_per_s"] / r["baseline"]["frames_per_s"] == pytest.approx(
            r["speedup_frames_per_s"], rel=1e-6)
    assert "ratio" in res.stdout


def test_bench_model_dir_fp32_matches_baseline_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("STEMGEN_BACKEND", "reference")   # by default fp32 GEMMs are oneDNN's (other last bits)
    cfg = StemGenConfig(d_model=64, n_heads=4, n_layers=2, codebook_size=64, ffn_multiple_of=32)
    _, model = make_model_dir(tmp_path, cfg)
    out = tmp_path / "b.json"
    res = runner.invoke(app, ["bench", "--model", str(model), "--duration", "2", "--steps", "4,2,2,1", "--batch", "3",
                              "--dtype", "float32", "--device", "cpu", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["results"][0]["token_agreement"] == 1.0


def test_bench_repeat_alternates_and_takes_each_sides_best(tmp_path):
    """--repeat 3: three runs of each side per batch, all walls kept; each side's figure is its best
    run and the ratio is the two bests'."""
    out = tmp_path / "rep.json"
    res = runner.invoke(app, ["bench", "--config", "tiny", "--duration", "1", "--steps", "2,1,1,1", "--batch", "1",
                              "--device", "cpu", "--repeat", "3", "--json", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert rep["settings"]["repeat"] == 3
    (r,) = rep["results"]
    for side in ("engine", "baseline"):
        assert len(r[side]["walls_s"]) == 3 and r[side]["wall_s"] == min(r[side]["walls_s"])
    assert r["speedup_frames_per_s"] == pytest.approx(r["baseline"]["wall_s"] / r["engine"]["wall_s"], rel=1e-9)
    assert "best of 3" in res.output
    bad = runner.invoke(app, ["bench", "--config", "tiny", "--repeat", "0", "--device", "cpu"])
    assert bad.exit_code != 0 and "--repeat must be 1-20" in bad.output and "Traceback" not in bad.output


def test_bench_bad_arguments():
    res = runner.invoke(app, ["bench", "--config", "tiny", "--batch", "x"])
    assert res.exit_code != 0 and "--batch" in res.stderr
    res = runner.invoke(app, ["bench", "--config", "huge", "--device", "cpu"])
    assert res.exit_code != 0 and "unknown preset" in res.stderr


def test_saturation_point():
    from stemgen.bench import saturation
    assert saturation([(1, 100.0)]) is None
    sat = saturation([(8, 250.0), (1, 100.0), (4, 240.0), (2, 180.0)])
    assert sat["batch"] == 4 and sat["reached"] and sat["best_frames_per_s"] == 250.0
    sat = saturation([(1, 100.0), (2, 200.0)])
    assert sat["batch"] == 2 and not sat["reached"]


def test_bench_report_renders_figures_from_files(tiny_bench, tmp_path):
    gen = tiny_bench[0]
    rep = json.loads(gen.read_text())
    assert rep["saturation"]["batch"] in (1, 2)
    ops = tmp_path / "ops.json"
    ops.write_text(json.dumps({"machine_info": {"cpu": {"brand_raw": "Test CPU"}, "gpu": "Test GPU 80GB",
                                                "python_version": "3.12"}, "datetime": "2026-11-25T00:00:00",
                               "benchmarks": [
                                   {"group": "attention T=500", "name": "a", "params": {"impl": "triton"},
                                    "stats": {"mean": 0.002}},
                                   {"group": "attention T=500", "name": "b", "params": {"impl": "sdpa"},
                                    "stats": {"mean": 0.003}},
                                   # bench/test_ops_bench.py's form: the op is a parameter the JSON
                                   # cannot hold; the implementation is the test id's last part
                                   {"group": "norm T=7", "name": "test_rms_norm[7-3-reference]",
                                    "params": {"fn": "UNSERIALIZABLE[<function>]"}, "stats": {"mean": 0.004}},
                                   {"group": "norm T=7", "name": "test_rms_norm[7-3-triton]",
                                    "params": {"fn": "UNSERIALIZABLE[<function>]"}, "stats": {"mean": 0.001}}]}))
    out = tmp_path / "RESULTS.md"
    res = runner.invoke(app, ["bench-report", str(gen), str(ops), "--out", str(out)])
    assert res.exit_code == 0, res.output
    md = out.read_text()
    ratio = rep["results"][0]["speedup_frames_per_s"]
    assert f"**{ratio:.2f}x**" in md and "gen.json" in md and "ops.json" in md
    assert "Test GPU 80GB" in md and "| attention T=500 | sdpa | 3.000 | 1.50x |" in md
    assert "| norm T=7 | reference | 4.000 | 4.00x |" in md and "| norm T=7 | triton | 1.000 |  |" in md
    assert "Throughput saturates at batch" in md and "STEMGEN_FLASH_CONFIG" not in md
    rep["machine"]["flash_config"] = "rope=q,tma=1"   # a run with another attention configuration says so
    tried = tmp_path / "tried.json"
    tried.write_text(json.dumps(rep))
    assert runner.invoke(app, ["bench-report", str(tried), "--out", str(out)]).exit_code == 0
    assert "attention configuration STEMGEN_FLASH_CONFIG=rope=q,tma=1." in out.read_text()


def test_bench_report_bad_inputs(tmp_path):
    out = tmp_path / "R.md"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"a": 1}))
    for f, msg in [(bad, "not JSON"), (other, "neither"), (tmp_path / "missing.json", "no such file")]:
        res = runner.invoke(app, ["bench-report", str(f), "--out", str(out)])
        assert res.exit_code != 0 and msg in res.stderr, res.output
        assert not out.exists() and not list(tmp_path.glob(".R.md*"))


def test_rates_keep_their_digits_below_ten():
    from stemgen.bench import rate

    assert [rate(x) for x in (0.2756, 0.005511, 1.2795, 63.6, 1995.7)] == ["0.276", "0.00551", "1.28", "64", "1996"]


def test_machine_info_says_when_the_gemm_libraries_are_held_to_another_isa(monkeypatch):
    """A stand-in run (ISA-limiting variables set) records them with its figures; a plain run records none."""
    from stemgen.bench import CPU_ISA_LIMITS, machine_info
    for k in CPU_ISA_LIMITS:
        monkeypatch.delenv(k, raising=False)
    assert "cpu_isa_limits" not in machine_info(torch.device("cpu"))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert machine_info(torch.device("cpu"))["cpu_isa_limits"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_bench_records_the_cpus_matrix_features(tiny_bench, tmp_path, monkeypatch):
    """A CPU's model name ('AMD EPYC') does not tell an AVX2-only part from one with VNNI and bf16: the
    JSON and the rendered report carry the instruction sets that decide each dtype's GEMM speed."""
    import builtins
    import io

    from stemgen import bench
    from stemgen.report import render_generation

    rep = json.loads(tiny_bench[0].read_text())
    assert rep["machine"]["cpu_features"] == bench.cpu_features()
    assert f"({rep['machine']['cpu_features']})" in "\n".join(render_generation("gen.json", rep))
    assert f"({bench.cpu_features()})" in tiny_bench[1].stdout
    real_open = builtins.open

    def fake(flags):
        return lambda p, *a, **k: io.StringIO(f"model name\t: X\nflags\t\t: {flags}\n") if p == "/proc/cpuinfo" \
            else real_open(p, *a, **k)
    monkeypatch.setattr(builtins, "open", fake("fpu sse avx2 fma avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8"))
    assert bench.cpu_features() == "avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8"
    monkeypatch.setattr(builtins, "open", fake("fpu sse sse2 avx fma avx2"))
    assert bench.cpu_features() == "avx2"
    monkeypatch.setattr(builtins, "open", fake("fpu sse sse2"))
    assert bench.cpu_features().startswith("none of avx2")
