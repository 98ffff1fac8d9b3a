"""Long-form generation on the demo model: stereo 44.1 kHz toy-band contexts of several lengths
(every stem but the bass), `stemgen generate -i bass` on each in a fresh process, its peak memory
(max RSS) and wall time, the stem's length against the context's, and how well the stem listens in
its first and its last minute: chord-root agreement with the song's chords, key agreement (bars
whose strongest bass pitch class is in the song's scale; chance 7/12) and tempo within 4%.

    python bench/longform.py --out /tmp/longform --seconds 30,90,180 --steps magnet
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from stemgen.engine.audio import read_audio, write_audio_set
from stemgen.evaluation import dsp
from stemgen.evaluation.corpus import MAJOR, MINOR, make_song, metadata, render_song
from stemgen.evaluation.listening import chord_root_agreement, tempo_agreement


def stereo_context(seconds: float, seed: int, sr: int = 44100):
    """A toy song at least ``seconds`` long, cut to it: (context [2, N] without the bass, ground truth)."""
    rng = np.random.default_rng(seed)
    song = make_song(rng, bars=8)
    song = make_song(np.random.default_rng(seed), bars=int(np.ceil(seconds / song.bar_s)) + 1)
    stems = render_song(song, sr, seed)
    n = int(round(seconds * sr))
    pan = {"S00": (0.5, 0.5), "S02": (0.7, 0.3), "S03": (0.3, 0.7)}   # drums centre, pad left, lead right
    ctx = sum(np.stack([gl * stems[s][:n], gr * stems[s][:n]]) for s, (gl, gr) in pan.items())
    return ctx.astype(np.float32), metadata(song, sr)["ground_truth"]


def key_agreement(stem: np.ndarray, sr: int, gt: dict) -> float:
    """Share of sounding bars whose strongest bass pitch class lies in the song's key (chance 7/12)."""
    x = dsp.prepare(stem, sr)
    scale = {(gt["tonic"] + s) % 12 for s in (MAJOR if gt["mode"] == "major" else MINOR)}
    bar = int(round(gt["bar_seconds"] * dsp.SR))
    hits = [int(np.argmax(dsp.bass_chroma(x[b:b + bar]))) in scale for b in range(0, len(x) - bar + 1, bar)
            if np.sqrt((x[b:b + bar] ** 2).mean()) >= 1e-4]
    return float(np.mean(hits)) if hits else 0.0


def minute(stem: np.ndarray, sr: int, gt: dict, start_s: float, length_s: float = 60.0) -> dict:
    """Listening figures of the stem from ``start_s`` (moved to the next bar line) for ``length_s``."""
    first_bar = int(np.ceil(start_s / gt["bar_seconds"] - 1e-9))
    t0 = first_bar * gt["bar_seconds"]
    seg = stem[..., int(round(t0 * sr)): int(round((t0 + length_s) * sr))]
    g = dict(gt, chords=gt["chords"][first_bar:])
    return {"from_s": round(t0, 2), "chord_root": chord_root_agreement(seg, sr, g),
            "key": key_agreement(seg, sr, g), "tempo_within_4pct": tempo_agreement(seg, sr, g)}


def run(cmd: list[str]) -> tuple[float, float]:
    """Run a command; -> (wall seconds, its peak RSS in MB)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {p.returncode})")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seconds", default="30,90,180")
    ap.add_argument("--steps", default="magnet", help="passed to stemgen generate (paper: the reference default)")
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"cpu": platform.processor() or platform.machine(), "steps": args.steps, "runs": []}
    for seconds in (float(s) for s in args.seconds.split(",")):
        ctx, gt = stereo_context(seconds, args.seed)
        ctx_path, stem_path = args.out / f"context-{seconds:g}s.wav", args.out / f"bass-{seconds:g}s.wav"
        write_audio_set([(ctx_path, ctx, 44100)])
        wall, peak = run([sys.executable, "-m", "stemgen", "generate", str(ctx_path), "-i", "bass", "--out",
                          str(stem_path), "--steps", args.steps, "--seed", "0", "--force"])
        stem, sr = read_audio(stem_path)
        row = {"seconds": seconds, "wall_s": round(wall, 1), "peak_rss_mb": round(peak), "stem_s": stem.shape[-1] / sr,
               "context_s": ctx.shape[-1] / 44100, "stem_rate": sr, "stem_channels": stem.shape[0],
               "tempo": gt["tempo"], "key": gt["key"]}
        if seconds >= 120:
            row["first_minute"] = minute(stem.mean(0), sr, gt, 0.0)
            row["last_minute"] = minute(stem.mean(0), sr, gt, seconds - 60.0 - gt["bar_seconds"])
        print(json.dumps(row), flush=True)
        report["runs"].append(row)
    (args.out / "longform.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
