"""How far the CPU's int8 path (`--dtype int8`) moves the logits from fp32's (``--dtype bfloat16``: the
same figures for bf16, the default where the CPU has native bf16, to set them beside).

For a model directory (default: the shipped demo) and held-out toy-band songs (`stemgen make-corpus
DIR --songs 40 --seed 1000`), each song's bass and drums are encoded with the model's codec and the
LM is run in fp32 and in int8 on the same guidance rows (multi CFG: 3 rows) as a decoding step sees
them: levels below the one decoded are the real stem's codes, the level decoded is masked at every
frame (the level's first step) or at a random half of them (mid-level), the levels above masked.
With ``--config small`` (no corpus) the model is that preset with random weights and the codes are
random. Reported over all rows and masked frames, per level and in all:

  max error    max |int8 - fp32| / max |fp32|  (the scale the guidance and sampling see)
  mean error   mean |int8 - fp32| / mean |fp32|   (int8: or the --dtype given)
  top-1        share of (row, frame) whose argmax code is the same
  guided       the multi-CFG distribution a step samples from (temperature 1), fp32's against the
               compared model's as its engine runs it (the guidance folded before the head where its
               fold_guidance op does; --head-on-every-row: not): total variation distance per frame
               (mean, max) and the share of frames whose most likely code is the same

    .venv/bin/python bench/int8_fidelity.py --corpus /tmp/heldout --songs 40
    .venv/bin/python bench/int8_fidelity.py --config small
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from stemgen.engine.config import SamplingConfig
from stemgen.engine.request import guidance_rows
from stemgen.kernels.guidance_fold import fold_guidance_ref, guided_distribution


def guided_dist(lm, r: tuple, weights: list[float], fold: bool) -> torch.Tensor:
    """The guided distribution [M, V] a step samples from (temperature 1): the head on every row then
    the guidance (fold False), or as ``lm``'s own fold_guidance op runs it (kernels.guidance_fold)."""
    return guided_distribution(lm.forward_requests([r], [weights] if fold else None)[0], weights).exp()


def compare(fp32, other, rows: list[tuple], weights: list[float] | None = None) -> dict:
    """rows: (tokens [R, C, Q, T], conditions [R, S], level, positions) inputs of forward_requests.
    With the guidance ``weights`` of those rows, also the guided distributions: fp32's (every row)
    against ``other``'s as its engine runs it (its guidance fold included)."""
    per_level: dict[int, list] = {}
    for r in rows:
        a, b = (m.forward_requests([r])[0] for m in (fp32, other))
        ga, gb = (guided_dist(fp32, r, weights, False), guided_dist(other, r, weights, True)) if weights else (None, None)
        per_level.setdefault(r[2], []).append((a, b, ga, gb))
    out = {}
    for level in sorted(per_level) + ["all"]:
        pairs = [p for lv in per_level for p in per_level[lv]] if level == "all" else per_level[level]
        a = torch.cat([p[0].reshape(-1, p[0].shape[-1]) for p in pairs])
        b = torch.cat([p[1].reshape(-1, p[1].shape[-1]) for p in pairs])
        err = (a - b).abs()
        out[str(level)] = dict(max_error=float(err.max() / a.abs().max()), mean_error=float(err.mean() / a.abs().mean()),
                               top1=float((a.argmax(-1) == b.argmax(-1)).float().mean()), frames=a.shape[0])
        if weights:
            ga, gb = torch.cat([p[2] for p in pairs]), torch.cat([p[3] for p in pairs])
            tv = (ga - gb).abs().sum(-1) / 2          # total variation distance per frame
            out[str(level)].update(guided_tv_mean=float(tv.mean()), guided_tv_max=float(tv.max()),
                                   guided_top1=float((ga.argmax(-1) == gb.argmax(-1)).float().mean()))
    return out


def step_rows(cfg, context, conditions, real, g: torch.Generator) -> list[tuple]:
    """The guidance rows of a first and a mid-level step at every level (see the module's text)."""
    rows = []
    Q, T = real.shape
    for level in range(Q):
        for share in (1.0, 0.5):
            target = real.clone()
            target[level + 1:] = cfg.mask_id
            masked = torch.rand(T, generator=g) < share if share < 1 else torch.ones(T, dtype=torch.bool)
            target[level, masked] = cfg.mask_id
            tokens, conds = guidance_rows(context, target, conditions, "multi", cfg)
            rows.append((tokens, conds, level, masked.nonzero()[:, 0]))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo", help="engine model directory (default: the shipped demo)")
    p.add_argument("--corpus", help="held-out toy-band corpus (stemgen make-corpus)")
    p.add_argument("--songs", type=int, default=40)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--config", help="a preset with random weights and random codes instead (e.g. small)")
    p.add_argument("--frames", type=int, default=500, help="with --config: frames per example")
    p.add_argument("--examples", type=int, default=4, help="with --config: random examples")
    p.add_argument("--dtype", default="int8", choices=["int8", "bfloat16"], help="the dtype set against fp32")
    p.add_argument("--head-on-every-row", action="store_true",
                   help="the compared model's head on every guidance row (its guidance fold off)")
    p.add_argument("--json", help="write the figures here too")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if a.config:
        from stemgen.bench import build_models
        fp32 = build_models(None, a.config, torch.device("cpu"), torch.float32, False, 0)[0]
        other = build_models(None, a.config, torch.device("cpu"), a.dtype, False, 0)[0]
        cfg = fp32.cfg
        rows = []
        for _ in range(a.examples):
            ctx = torch.randint(0, cfg.codebook_size, (cfg.n_channels - 1, cfg.n_q, a.frames), generator=g)
            real = torch.randint(0, cfg.codebook_size, (cfg.n_q, a.frames), generator=g)
            cond = torch.tensor([int(torch.randint(0, s, (1,), generator=g)) for s in cfg.cond_sizes])
            rows += step_rows(cfg, ctx, cond, real, g)
        source = f"preset {a.config!r}, random weights and codes, {a.examples} x {a.frames} frames"
    else:
        if not a.corpus:
            sys.exit("give --corpus DIR (held-out songs: stemgen make-corpus DIR --songs 40 --seed 1000) or --config NAME")
        from stemgen.engine import Engine
        from stemgen.evaluation.listening import heldout_songs
        engines = [Engine.from_pretrained(a.model, device="cpu", dtype=d) for d in ("float32", a.dtype)]
        fp32, other = (e.lm for e in engines)
        cfg = fp32.cfg
        rows = []
        for song in heldout_songs(a.corpus, a.songs, a.seconds):
            for inst in ("bass", "drums"):
                _, ctx = engines[0].prepare_context(song["contexts"][inst][None], song["sr"])
                _, real = engines[0].encode(song["stems"][inst][None], song["sr"])
                cond = torch.tensor([engines[0].instrument_id(inst)])
                rows += step_rows(cfg, ctx[: cfg.n_channels - 1], cond, real[:, : ctx.shape[-1]], g)
        source = f"{a.model}, {a.songs} held-out songs of {a.corpus} x bass, drums, first {a.seconds:g} s"
    if a.head_on_every_row:
        other.ops.fold_guidance = fold_guidance_ref
        other.ops.names["fold_guidance"] = "on every guidance row (--head-on-every-row)"
    weights = SamplingConfig(guidance="multi").guidance_weights()   # the rows step_rows builds
    with torch.inference_mode():
        res = compare(fp32, other, rows, weights)
    from stemgen.bench import cpu_label
    cpu = cpu_label(a.dtype)
    print(f"{a.dtype} vs fp32 logits: {source}; CPU {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"guided distribution: multi CFG {weights}, the compared model's head {other.ops.names['fold_guidance']}")
    print("| level | max error | mean error | top-1 agreement | frames x rows | guided: total variation mean / max "
          "| guided top-1 |\n| --- | --- | --- | --- | --- | --- | --- |")
    for level, r in res.items():
        print(f"| {level} | {r['max_error']:.2%} | {r['mean_error']:.2%} | {r['top1']:.1%} | {r['frames']} "
              f"| {r['guided_tv_mean']:.4f} / {r['guided_tv_max']:.4f} | {r['guided_top1']:.1%} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(dtype=a.dtype, source=source, cpu=cpu, torch=torch.__version__, weights=weights,
                           head=other.ops.names["fold_guidance"], levels=res), f, indent=1)


if __name__ == "__main__":
    main()
