"""Is a song's harmony in the codec's tokens, and where? A diagnostic for `stemgen train` runs.

For every track of a toy-band corpus (ground-truth chords per bar in metadata.yaml) and its token
cache (OUT/tokens of `stemgen train`, built with --contexts rest or all), a linear probe (logistic
regression on one-hot codes of the chosen RVQ levels, averaged over +-W frames) learns the bar's
chord root from the codes of one stem or mix; it is trained on the first tracks and scored on the
last --test tracks. What it shows: how much of the chord root a model could read from its context
tokens with a linear read-out, next to how much the bass stem's own tokens carry.

With --lm RUN/model.pt (an LM trained on that cache) it also asks whether the LM plays the chords
at the sampler's first step: the bass fully masked, the held-out song's context in, the first
level's most likely code per frame out, read by the probe trained on real bass codes (first level,
+-W frames); beside it the same with another held-out song's context and with the NULL context.

    python train/recipes/harmony_probe.py CORPUS OUT/tokens [--test 20] [--window 12] [--lm RUN/model.pt ...]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from stemgen.evaluation.corpus import song_from_metadata

FRAME_RATE = 50  # codec frames per second (the demo codec's and MusicGen's 32 kHz codec's)
LM_FRAMES = 500  # frames the LM sees at once (the demo LM's training crop, --frames)
SOURCES = {"bass stem": lambda cls: ["Bass"], "pad stem": lambda cls: ["Synth Pad"],
           "context: every stem but the bass": lambda cls: [c for c in cls if c != "Bass"]}


def examples(corpus: Path, cache: Path):
    """Per source: a list of (codes [Q, T] of that stem or mix, root per frame [T]) per track."""
    index = json.loads((cache / "index.json").read_text())
    arrays = load_file(str(cache / "tokens.safetensors"))
    out = {name: [] for name in SOURCES}
    for i, (name, e) in enumerate(zip(index["key"]["tracks"], index["tracks"])):
        song = song_from_metadata(yaml.safe_load((corpus / name / "metadata.yaml").read_text()))
        bar = song.bar_s * FRAME_RATE  # codec frames per bar
        roots = [root for root, _ in song.chords]
        subsets = {tuple(s): j for j, s in enumerate(e["subsets"])}
        codes = arrays[f"{i}.codes"].long()
        for source, pick in SOURCES.items():
            key = tuple(sorted(e["classes"].index(c) for c in pick(e["classes"])))
            if key not in subsets:
                raise SystemExit(f"{cache}: no mix of {pick(e['classes'])} for {name}; tokenise with --contexts rest or all")
            c = codes[subsets[key]]
            T = min(c.shape[1], int(len(roots) * bar))
            out[source].append((c[:, :T], torch.tensor([roots[int(t // bar)] for t in range(T)])))
    return out


def features(items, levels, window: int, K: int, stride: int = 3):
    X, Y = [], []
    for c, r in items:
        oh = torch.cat([F.one_hot(c[q], K).float() for q in levels], 1)
        if window:
            oh = F.avg_pool1d(oh.T[None], 2 * window + 1, 1, window, count_include_pad=False)[0].T
        X.append(oh[::stride])
        Y.append(r[::stride])
    return torch.cat(X), torch.cat(Y)


def fit(train, levels, window: int, K: int, iters: int = 150):
    """A logistic-regression probe of the chord root; returns its scorer: items -> accuracy."""
    Xtr, Ytr = features(train, levels, window, K)
    W = torch.zeros(Xtr.shape[1], 12, requires_grad=True)
    b = torch.zeros(12, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=0.05)
    for _ in range(iters):
        opt.zero_grad()
        loss = F.cross_entropy(Xtr @ W + b, Ytr) + 1e-4 * W.pow(2).sum()
        loss.backward()
        opt.step()

    def score(items) -> float:
        X, Y = features(items, levels, window, K)
        return float(((X @ W + b).argmax(1) == Y).float().mean())
    return score


def probe(train, test, levels, window: int, K: int) -> float:
    return fit(train, levels, window, K)(test)


def lm_first_step(lm_path: Path, data, n_test: int, window: int, K: int, read) -> None:
    """Chord root of the LM's first-step bass (most likely first-level code per frame) by ``read``,
    the probe fitted on real bass codes (first level, +-window frames)."""
    from stemgen.train.model import load_checkpoint

    lm = load_checkpoint(lm_path).eval()
    cfg = lm.cfg
    if "bass" not in cfg.instruments or cfg.codebook_size < K:
        raise SystemExit(f"{lm_path}: not an LM of this cache (needs a bass instrument and {K} codes)")
    bass, ctx = data["bass stem"], data["context: every stem but the bass"]
    print(f"\nLM {lm_path}, bass at the sampler's first step, chord root by the probe of real bass codes "
          f"(first level, +-{window} frames; the real held-out bass scores {read(bass[-n_test:]):.3f}):")
    for mode in ("the song's context", "another song's context", "NULL context"):
        items = []
        for j, (b, roots) in enumerate(bass[-n_test:]):
            c = ctx[-n_test:][(j + 1) % n_test if mode.startswith("another") else j][0]
            T = min(b.shape[1], c.shape[1], LM_FRAMES)
            tok = torch.full((1, 2, cfg.n_q, T), cfg.mask_id, dtype=torch.long)
            tok[0, 0] = cfg.null_id if mode.startswith("NULL") else c[:, :T]
            with torch.no_grad():
                codes = lm(tok, torch.tensor([[cfg.instruments.index("bass")]]))[0, 0].argmax(-1)
            items.append((codes[None], roots[:T]))
        print(f"  {mode}: {read(items):.3f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("cache", type=Path)
    ap.add_argument("--test", type=int, default=20, help="held-out tracks (the last ones)")
    ap.add_argument("--window", type=int, default=12, help="frames averaged on each side")
    ap.add_argument("--lm", type=Path, action="append", default=[],
                    help="an LM checkpoint trained on this cache (RUN/model.pt); may be repeated")
    args = ap.parse_args()
    torch.manual_seed(0)
    data = examples(args.corpus, args.cache)
    K = 1 + max(int(c.max()) for items in data.values() for c, _ in items)
    n_q = next(iter(data.values()))[0][0].shape[0]
    roots = torch.cat([r for _, r in data["bass stem"][-args.test:]])
    majority = float(torch.bincount(roots, minlength=12).max()) / len(roots)
    print(f"{len(data['bass stem'])} tracks, last {args.test} held out; codebook {K}; "
          f"always guessing the commonest held-out root scores {majority:.3f}")
    print("| source | levels | +-0 frames | +-%d frames |" % args.window)
    print("|---|---|---|---|")
    for source, items in data.items():
        train, test = items[:-args.test], items[-args.test:]
        for levels in ([0], list(range(n_q))):
            accs = [probe(train, test, levels, w, K) for w in (0, args.window)]
            print(f"| {source} | {','.join(map(str, levels))} | {accs[0]:.3f} | {accs[1]:.3f} |", flush=True)
    if args.lm:
        read = fit(data["bass stem"][:-args.test], [0], args.window, K)   # fitted once for every --lm
        for lm in args.lm:
            lm_first_step(lm, data, args.test, args.window, K, read)


if __name__ == "__main__":
    main()
