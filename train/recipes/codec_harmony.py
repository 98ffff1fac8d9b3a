"""Does a codec keep the harmony? A diagnostic for `stemgen train-codec` runs.

For the first N tracks of a toy-band corpus (ground-truth chords per bar in metadata.yaml) it reads
the chord of every bar by triad templates on the chroma (`stemgen.evaluation.dsp`) of: the pad stem
and the LM's context for a bass (drums + pad + lead mixed), each as rendered and after a round trip
through the codec (all RVQ levels, and the first level alone), and the bass's chord root after
the round trip (the Table 3 ceiling). Scores are the share of bars whose read root is the true one.
What it shows: whether the chords a bass should follow survive the codec at all; an LM cannot hear
what its context tokens do not carry.

    python train/recipes/codec_harmony.py CODEC CORPUS [--songs 10]

CODEC: an engine model directory or any codec source `stemgen convert --codec` reads.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import yaml

from stemgen.evaluation import dsp
from stemgen.evaluation.corpus import song_from_metadata
from stemgen.evaluation.listening import chord_root_agreement
from stemgen.train.data import read_track
from stemgen.weights_convert.codec import load_codec_any


def chord_roots(audio: np.ndarray, sr: int, roots: list[int], bar_seconds: float) -> tuple[int, int]:
    """(bars whose template-read root is the true one, bars) of one signal."""
    chroma = dsp.chroma(dsp.stft_mag(dsp.prepare(audio, sr)))
    got = dsp.chords(chroma, bar_seconds * dsp.SR / dsp.HOP)
    return sum(int(g[0] == r) for g, r in zip(got, roots)), min(len(got), len(roots))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("codec")
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--songs", type=int, default=10)
    args = ap.parse_args()
    codec, _ = load_codec_any(args.codec)
    sr = codec.cfg.sample_rate

    def through(x: np.ndarray, levels: int | None = None) -> np.ndarray:
        with torch.no_grad():
            codes = codec.encode(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None])
            return codec.decode(codes[:, :levels] if levels else codes)[0, 0].numpy()

    hits: dict[str, list[int]] = {}
    bass = []
    for track in sorted(args.corpus.glob("Track*"))[:args.songs]:
        meta = yaml.safe_load((track / "metadata.yaml").read_text())
        song = song_from_metadata(meta)
        roots = [root for root, _ in song.chords]
        classes, stems = read_track(track, sr)
        pad = stems[classes.index("Synth Pad")]
        context = stems[[k for k, c in enumerate(classes) if c != "Bass"]].sum(0)
        context = context / max(np.abs(context).max() / 0.99, 1.0)  # as `stemgen train` tokenises mixes
        for name, x in (("pad", pad), ("pad through the codec", through(pad)), ("context", context),
                        ("context through the codec", through(context)),
                        ("context, first level only", through(context, 1))):
            h, n = chord_roots(x, sr, roots, song.bar_s)
            hit = hits.setdefault(name, [0, 0])
            hit[0] += h
            hit[1] += n
        bass.append(chord_root_agreement(through(stems[classes.index("Bass")]), sr, meta["ground_truth"]))
    for name, (h, n) in hits.items():
        print(f"{name:28s} chord roots {h / max(n, 1):.3f} of {n} bars")
    print(f"{'bass through the codec':28s} chord roots {np.mean(bass):.3f} (mean over songs: Table 3's ceiling)")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
