"""`stemgen serve`: a real uvicorn server on 127.0.0.1 and a real HTTP client."""
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

pytest.importorskip("fastapi")
import httpx  # noqa: E402
import uvicorn  # noqa: E402

from stemgen.cli import app as cli_app  # noqa: E402
from stemgen.engine import Engine  # noqa: E402
from stemgen.serve import Limits, create_app  # noqa: E402

from helpers import tiny_model_dir  # noqa: E402

STEPS = "3,2,1,1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, seconds: float = 10.0) -> None:
    """Poll until the server answers 200 at url."""
    t0 = time.time()
    while time.time() - t0 < seconds:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} did not come up in {seconds:g} s")


def wav_bytes(seconds=1.0, sr=16000, f=220.0) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    buf = io.BytesIO()
    sf.write(buf, 0.3 * np.sin(2 * np.pi * f * t), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("srv"))


@pytest.fixture(scope="module")
def server(model):
    engine = Engine.from_pretrained(model, device="cpu", dtype="float32")
    port = free_port()
    app = create_app(engine, Limits(max_upload_mb=1.0, max_seconds=20, max_sync_seconds=5, max_jobs=40))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait_up(base + "/healthz")
    yield base, engine
    srv.should_exit = True
    thread.join(30)


def submit(base, data, **fields):
    return httpx.post(base + "/v1/jobs", files={"file": ("c.wav", data, "audio/wav")},
                      data={"instrument": "bass", "steps": STEPS, **fields}, timeout=30)


def wait(base, job_id, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        st = httpx.get(f"{base}/v1/jobs/{job_id}", timeout=10).json()
        if st["status"] not in ("queued", "running"):
            return st
        time.sleep(0.05)
    raise AssertionError("job did not finish")


def test_32_concurrent_requests_equal_the_cli(server, model, tmp_path):
    base, engine = server
    contexts = [wav_bytes(0.5 + 0.05 * i, f=110 + 10 * i) for i in range(32)]

    def one(i):
        r = submit(base, contexts[i], seed=str(i))
        assert r.status_code == 202, r.text
        st = wait(base, r.json()["id"])
        assert st["status"] == "done" and st["progress"] == 1.0, st
        return httpx.get(f"{base}/v1/jobs/{st['id']}/audio", timeout=30).content

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(32)))
    steps_after = engine.service.stats["steps"]
    for i in (0, 17, 31):   # the CLI writes the same bytes for the same context and seed
        ctx = tmp_path / f"c{i}.wav"
        ctx.write_bytes(contexts[i])
        out = tmp_path / f"o{i}.wav"
        res = CliRunner().invoke(cli_app, ["generate", str(ctx), "-i", "bass", "--out", str(out), "--model",
                                           str(model), "--steps", STEPS, "--seed", str(i), "--dtype", "float32"])
        assert res.exit_code == 0, res.output
        assert sf.read(out)[0].tolist() == sf.read(io.BytesIO(results[i]))[0].tolist()
    # batching across HTTP requests: far fewer scheduler steps than 32 requests x 7 steps each
    assert steps_after < 32 * 7
    metrics = httpx.get(base + "/metrics").text
    assert 'stemgen_requests_total{outcome="done"}' in metrics and "stemgen_step_latency_seconds" in metrics


@pytest.mark.parametrize("files, data, status, needle", [
    ({"file": ("c.wav", b"garbage", "audio/wav")}, {"instrument": "bass"}, 400, "not readable audio"),
    (None, {"instrument": "bass"}, 400, "'file' part"),
    ({"file": ("c.wav", wav_bytes(), "audio/wav")}, {"instrument": "kazoo"}, 400, "unknown instrument"),
    ({"file": ("c.wav", wav_bytes(), "audio/wav")}, {"instrument": "bass", "temperature": "nan"}, 400, "temperature"),
    ({"file": ("c.wav", wav_bytes(), "audio/wav")}, {"instrument": "bass", "steps": "1,2"}, 400, "levels"),
    ({"file": ("c.wav", wav_bytes(), "audio/wav")}, {"instrument": "bass", "top_k": "x"}, 400, "top_k"),
    ({"file": ("c.wav", wav_bytes(), "audio/wav")}, {"instrument": "bass", "bogus": "1"}, 400, "unknown field"),
    ({"file": ("c.wav", wav_bytes(40.0, sr=8000), "audio/wav")}, {"instrument": "bass"}, 413, "limit"),
    ({"file": ("c.wav", b"x" * 1_100_000, "audio/wav")}, {"instrument": "bass"}, 413, "MB limit"),
])
def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(server, files, data, status, needle):
    base, _ = server
    r = httpx.post(base + "/v1/jobs", files=files, data=data, timeout=30)
    assert r.status_code == status and needle in r.json()["error"], (r.status_code, r.text)
    assert httpx.get(base + "/healthz").status_code == 200
    assert httpx.get(base + "/v1/jobs/nope").status_code == 404


def test_sync_endpoint_and_cancel(server):
    base, engine = server
    r = httpx.post(base + "/v1/generate", files={"file": ("c.wav", wav_bytes(), "audio/wav")},
                   data={"instrument": "drums", "steps": STEPS}, timeout=60)
    assert r.status_code == 200 and sf.info(io.BytesIO(r.content)).samplerate == 32000
    r = httpx.post(base + "/v1/generate", files={"file": ("c.wav", wav_bytes(8.0), "audio/wav")},
                   data={"instrument": "drums"}, timeout=60)
    assert r.status_code == 413 and "/v1/jobs" in r.json()["error"]
    job = submit(base, wav_bytes(3.0), steps="400,400,400,400").json()
    assert httpx.delete(f"{base}/v1/jobs/{job['id']}").status_code == 200
    assert wait(base, job["id"])["status"] == "cancelled"
    assert engine.service.queued == 0      # the slot is free
    assert httpx.get(f"{base}/v1/jobs/{job['id']}/audio").status_code == 409


def test_sigterm_with_jobs_in_flight_exits_cleanly(model):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "stemgen", "serve", "--model", str(model), "--port", str(port),
                             "--dtype", "float32"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_up(base + "/readyz", seconds=30)
        ids = [submit(base, wav_bytes(2.0), steps="300,300,300,300").json()["id"] for _ in range(3)]
        assert httpx.get(f"{base}/v1/jobs/{ids[0]}").json()["status"] in ("queued", "running")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read().decode()
    assert rc == 0, err[-2000:]
    assert "Traceback" not in err and "terminate called" not in err
