"""Throughput of `stemgen serve` under concurrent clients: start the server (demo model), then for
each client count N, N threads each POST /v1/generate the same short context K times; report
requests/s and audio seconds generated per second, against N = 1 (the server shares forwards
between concurrent requests through the engine's batched scheduler).

    python bench/serve_load.py --clients 1,4,8 --seconds 5 --steps magnet --requests 2
"""
from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import soundfile as sf

from stemgen.evaluation.corpus import make_song, render_song


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def context_wav(seconds: float) -> bytes:
    song = make_song(np.random.default_rng(3), bars=max(2, int(seconds) // 2 + 1))
    stems = render_song(song, 44100, 3)
    n = int(seconds * 44100)
    mix = sum(a[:n] for s, a in stems.items() if s != "S01").astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, mix, 44100, format="WAV")
    return buf.getvalue()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--steps", default="20,10,10,10")
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--model", default="demo")
    args = ap.parse_args(argv)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "stemgen", "serve", "--model", args.model, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise SystemExit("the server did not become ready")
        wav = context_wav(args.seconds)
        form = {"instrument": "bass", "steps": args.steps}

        def one(seed: int) -> None:
            r = httpx.post(base + "/v1/generate", files={"file": ("ctx.wav", wav, "audio/wav")},
                           data={**form, "seed": str(seed)}, timeout=3600)
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code}: {r.text[:200]}")

        one(0)   # warm-up
        rows = []
        for n in (int(c) for c in args.clients.split(",")):
            errors: list = []

            def client(i: int) -> None:
                try:
                    for k in range(args.requests):
                        one(1000 * i + k)
                except Exception as e:  # noqa: BLE001
                    errors.append(e)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            if errors:
                raise SystemExit(f"{n} clients: {errors[0]}")
            done = n * args.requests
            rows.append({"clients": n, "requests": done, "wall_s": round(wall, 2), "requests_per_s": done / wall,
                         "audio_s_per_s": done * args.seconds / wall})
            print(json.dumps(rows[-1]), flush=True)
        base_rate = rows[0]["audio_s_per_s"]
        for r in rows:
            r["vs_first"] = r["audio_s_per_s"] / base_rate
        print(f"{'clients':>7s} {'requests':>8s} {'wall s':>7s} {'audio s/s':>9s} {'vs ' + str(rows[0]['clients']):>6s}")
        for r in rows:
            print(f"{r['clients']:7d} {r['requests']:8d} {r['wall_s']:7.1f} {r['audio_s_per_s']:9.2f} "
                  f"{r['vs_first']:5.2f}x")
        return {"cpu_threads": os.cpu_count(), "seconds": args.seconds, "steps": args.steps, "rows": rows}
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
