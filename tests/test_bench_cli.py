"""`stemgen bench`: runs engine and baseline in one process and reports the ratio; on a converted
model in fp32 the engine's tokens equal the training-form baseline's."""
import json

from typer.testing import CliRunner

from stemgen.cli import app
from stemgen.train import StemGenConfig

from helpers import make_model_dir

runner = CliRunner()


def test_bench_preset_json(tmp_path):
    out = tmp_path / "b.json"
    res = runner.invoke(app, ["bench", "--config", "tiny", "--duration", "1", "--steps", "2,1,1,1", "--batch", "1,2",
                              "--device", "cpu", "--json", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert rep["machine"]["torch"] and rep["settings"]["frames"] == 50
    for r in rep["results"]:
        for k in ("step_latency_ms", "transformer_passes_per_s", "frames_per_s", "audio_s_per_wall_s", "peak_mb"):
            assert r["engine"][k] > 0 and r["baseline"][k] > 0
        assert r["speedup_frames_per_s"] > 0
    assert "ratio" in res.stdout


def test_bench_model_dir_fp32_matches_baseline_tokens(tmp_path):
    cfg = StemGenConfig(d_model=64, n_heads=4, n_layers=2, codebook_size=64, ffn_multiple_of=32)
    _, model = make_model_dir(tmp_path, cfg)
    out = tmp_path / "b.json"
    res = runner.invoke(app, ["bench", "--model", str(model), "--duration", "2", "--steps", "4,2,2,1", "--batch", "3",
                              "--dtype", "float32", "--device", "cpu", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["results"][0]["token_agreement"] == 1.0


def test_bench_bad_arguments():
    res = runner.invoke(app, ["bench", "--config", "tiny", "--batch", "x"])
    assert res.exit_code != 0 and "--batch" in res.stderr
    res = runner.invoke(app, ["bench", "--config", "huge", "--device", "cpu"])
    assert res.exit_code != 0 and "unknown preset" in res.stderr
