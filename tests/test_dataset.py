"""`stemgen generate-dataset` on a local Ray: the same stems as the folder mode, resumable, and a
worker killed mid-run loses nothing."""
import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

pytest.importorskip("ray")
from stemgen.cli import app  # noqa: E402

from helpers import tiny_model_dir  # noqa: E402

runner = CliRunner()
FAST = ["--steps", "2,1,1,1", "--bits", "float", "--seed", "4"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds")
    model = tiny_model_dir(tmp)
    src = tmp / "ctx"
    src.mkdir()
    for i in range(12):
        t = np.arange(int((0.4 + 0.05 * i) * 32000)) / 32000
        sf.write(src / f"c{i:02d}.wav", (0.3 * np.sin(2 * np.pi * (100 + 20 * i) * t)).astype(np.float32), 32000)
    local = tmp / "local"
    res = runner.invoke(app, ["generate", str(src), "-i", "bass", "--out", str(local), "--model", str(model), *FAST])
    assert res.exit_code == 0, res.output
    yield tmp, model, src, local
    import ray
    ray.shutdown()


def test_ray_run_equals_folder_mode_and_survives_a_killed_worker(setup, monkeypatch):
    tmp, model, src, local = setup
    out = tmp / "ray_out"
    (out).mkdir()
    dead = dead_pid()
    (out / f".stemgen-{dead}-c00.wav.abcd.tmp").write_bytes(b"half")   # a temporary a killed writer left behind
    monkeypatch.setenv("STEMGEN_TEST_CRASH_ONCE", str(tmp / "crashed.flag"))
    res = runner.invoke(app, ["generate-dataset", str(src), "-i", "bass", "--out", str(out), "--model", str(model),
                              "--workers", "2", "--batch-size", "3", *FAST])
    assert res.exit_code == 0, res.output
    assert (tmp / "crashed.flag").exists(), "a worker died mid-run"
    assert "12 of 12 files written" in res.stdout
    for f in sorted(local.glob("*.wav")):
        # Ray workers run one thread each, the local run two: the LM's tokens do not depend on the
        # thread count, and the codec always runs with STEMGEN_CODEC_THREADS (1): the same samples
        np.testing.assert_array_equal(sf.read(out / f.name)[0], sf.read(f)[0], err_msg=f.name)
    assert not list(out.glob(".stemgen-*.tmp"))
    again = runner.invoke(app, ["generate-dataset", str(src), "-i", "bass", "--out", str(out), "--model", str(model),
                                *FAST])
    assert again.exit_code == 0 and "0 of 12 files written" in again.stdout and "(12 existed" in again.stdout


def dead_pid() -> int:
    import subprocess
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_only_its_own_stale_temporaries_are_cleared(setup):
    """generate-dataset clears what its own killed writers left beside its outputs, and nothing else:
    not another program's hidden .tmp files, not a live run's temporaries, not files elsewhere."""
    import os

    tmp, model, src, local = setup
    out = tmp / "own_tmp"
    out.mkdir()
    for f in local.glob("*.wav"):
        (out / f.name).write_bytes(f.read_bytes())           # every output exists: nothing to do
    (out / "sub").mkdir()
    dead = dead_pid()
    keep = [out / ".notes.tmp", out / ".c00.wav.abcd.tmp", out / "sub" / ".x.tmp",
            out / f".stemgen-{os.getpid()}-c01.wav.abcd.tmp",       # a live writer's
            out / f".stemgen-{dead}-other.wav.abcd.tmp",            # not an output of this run
            out / "sub" / f".stemgen-{dead}-c02.wav.abcd.tmp"]      # not beside an output of this run
    stale = out / f".stemgen-{dead}-c03.wav.k2j_x9.tmp"
    for p in keep + [stale]:
        p.write_bytes(b"x")
    res = runner.invoke(app, ["generate-dataset", str(src), "-i", "bass", "--out", str(out), "--model", str(model),
                              *FAST])
    assert res.exit_code == 0 and "0 of 12 files written" in res.stdout, res.output
    assert all(p.exists() for p in keep) and not stale.exists()


@pytest.mark.parametrize("opts, needle", [(["--gpus-per-worker", "1"], "no CUDA GPU"),
                                          (["--gpus-per-worker", "nan"], "--gpus-per-worker nan"),
                                          (["--device", "cuda"], "--device cuda needs --gpus-per-worker"),
                                          (["--workers", "0"], "--workers 0")])
def test_gpu_options_without_a_gpu_fail_at_once(setup, tmp_path, monkeypatch, opts, needle):
    """Without a GPU, --gpus-per-worker 1 made the local Ray wait forever for one: one line instead."""
    import torch

    import stemgen.dataset as ds
    tmp, model, src, local = setup
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ds, "generate_dataset", lambda *a, **k: pytest.fail("started the Ray run"))
    res = runner.invoke(app, ["generate-dataset", str(src), "-i", "bass", "--out", str(tmp_path / "o"), "--model",
                              str(model), *opts, *FAST])
    assert res.exit_code == 1 and res.stderr.startswith("error:") and needle in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
