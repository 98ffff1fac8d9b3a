"""A folder in one run against one run per file: N toy-band contexts of mixed lengths, then
`stemgen generate DIR/ -i bass --out OUT/` once (the model loads once, the files share the batched
scheduler) and `stemgen generate FILE -i bass --out F.wav` per file, same seed and steps; checks
the stems are identical and reports both wall times (whole processes) and the ratio.

    python bench/folder_run.py --work /tmp/folder --files 20 --steps magnet
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from stemgen.engine.audio import read_audio, write_audio_set
from stemgen.evaluation.corpus import make_song, render_song


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--steps", default="magnet")
    args = ap.parse_args(argv)
    ctx_dir, folder_out, single_out = args.work / "contexts", args.work / "folder", args.work / "single"
    for d in (ctx_dir, folder_out, single_out):
        d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    seconds = [float(s) for s in rng.uniform(2.0, 9.0, args.files).round(1)]
    items = []
    for i, s in enumerate(seconds):
        stems = render_song(make_song(np.random.default_rng(i), bars=8), 44100, i)
        n = int(s * 44100)
        items.append((ctx_dir / f"song{i:02d}.wav", sum(a[:n] for k, a in stems.items() if k != "S01"), 44100))
    write_audio_set(items)
    gen = [sys.executable, "-m", "stemgen", "generate"]
    opts = ["-i", "bass", "--steps", args.steps, "--seed", "0", "--force"]
    t_folder = timed(gen + [str(ctx_dir), "--out", str(folder_out)] + opts)
    t_single = sum(timed(gen + [str(p), "--out", str(single_out / p.name)] + opts) for p, _, _ in items)
    same = all(np.array_equal(read_audio(folder_out / p.name)[0], read_audio(single_out / p.name)[0])
               for p, _, _ in items)
    report = {"files": args.files, "audio_s": round(sum(seconds), 1), "steps": args.steps,
              "folder_run_s": round(t_folder, 1), "single_runs_s": round(t_single, 1),
              "speedup": round(t_single / t_folder, 2), "identical_stems": same}
    print(json.dumps(report))
    if not same:
        raise SystemExit("the folder run's stems differ from the single runs'")
    return report


if __name__ == "__main__":
    main()
