"""Where does the demo model's harmony go, and which sampler knob brings it back?

For held-out toy-band songs (``stemgen make-corpus DIR --songs 40 --seed 1000``) this generates a
stem (bass by default) for each song's context with the demo model through the Engine API, under a
list of sampler variants, and scores it with ``stemgen table3``'s ground-truth scoring: chord-root
agreement (bass), onsets on the eighth-note grid, tempo within 4%. Contexts, real stems and scores
come from ``evaluation.listening`` (heldout_songs, setting_options, score, round_trip), so the
figures are Table 3's: same crop (first ``--seconds``), same seeds (seed + song index), same
fp32 CPU engine.

A variant is ``NAME`` (one of VARIANTS below) or ``NAME:key=value,key=value``: SamplingConfig
overrides on top of a base (``base=paper``, the default, or ``base=naive``: listening.setting_options;
steps default 12,6,4,4 as Table 3, written ``steps=12/6/4/4``), plus

  mode=gen       the model writes every level (default)
  mode=l0model   the model writes level 0, levels 1-3 are the real stem's codes (a partial target)
  mode=l0real    level 0 is the real stem's, the model writes levels 1-3 (a partial target)
  mode=ceiling   the real stem through the codec (listening.round_trip)
  levels=1       decode only the first RVQ level (what level 0 alone plays)
  deaf=1         another song's context (Table 3's deaf control)

Per variant: mean over songs and its standard error (std / sqrt(n), ddof 1) of each score, the
paired difference from a reference variant (same songs, same seeds) and the wall time. Results
accumulate in --json (one entry per instrument x variant x songs x seconds; a rerun replaces its
entry) and the Markdown table is rewritten from all entries.

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python bench/listening_knobs.py --corpus /tmp/heldout \\
        --songs 20 paper naive "t05:temperature=0.5"
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent

from stemgen.bench import cpu_features, cpu_name  # noqa: E402
from stemgen.engine import Engine  # noqa: E402
from stemgen.engine.config import parse_sampling  # noqa: E402
from stemgen.evaluation import listening  # noqa: E402

# named variants (the list); anything else is given as NAME:key=value,...
VARIANTS = {
    "paper": "",
    "naive": "base=naive",
    "ceiling": "mode=ceiling",
    "ceiling-l0": "mode=ceiling,levels=1",
    "deaf": "deaf=1",
    # level 0 alone
    "l0model": "mode=l0model",                 # model level 0 + real levels 1-3
    "l0model-only": "mode=l0model,levels=1",  # model level 0, decoded alone
    "l0real": "mode=l0real",                   # real level 0 + model levels 1-3
    # steps on level 0
    "s0-32": "steps=32/6/4/4",
    "s0-64": "steps=64/6/4/4",
    "s0-128": "steps=128/6/4/4",
    # ranking
    "wc1": "w_confidence=1.0",
    "wc10": "w_confidence=10",
    "wr0.1": "w_random=0.1",
    "wr0": "w_random=0",
    "ws0": "w_causal=0",
    # sampling
    "t0.7": "temperature=0.7",
    "t0.5": "temperature=0.5",
    "t0.3": "temperature=0.3",
    "t0": "temperature=0",
    "k16": "top_k=16",
    "k64": "top_k=64",
    "p0.9": "top_p=0.9",
    # guidance
    "multi1": "cfg_context=1,cfg_instrument=1",
    "multi5": "cfg_context=5,cfg_instrument=5",
    "single3": "guidance=single,cfg_scale=3",
    "none": "guidance=none",
    # the sampler's first step only: level 0 in one step (every frame from the first distribution)
    "first-argmax": "guidance=none,steps=1/6/4/4,temperature=0",
    "first-sample": "steps=1/6/4/4",
}

SPECIAL = {"mode": str, "levels": int, "deaf": int, "base": str}


def parse_variant(arg: str) -> tuple[str, dict]:
    name, _, spec = arg.partition(":")
    if not spec:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}: give NAME:key=value,... or one of {', '.join(VARIANTS)}")
        spec = VARIANTS[name]
    opts, rest = {}, []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        key, _, value = (x.strip() for x in item.partition("="))
        if key in SPECIAL:
            opts[key] = SPECIAL[key](value)
        else:
            rest.append(item)
    try:
        opts.update(parse_sampling(",".join(rest), f"variant {name}"))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    return name, opts


def code_root_table(songs: list[dict], real_codes: list[torch.Tensor], fps: float, V: int) -> np.ndarray:
    """log P(chord root | level-0 code) [V, 12] from real bass stems (add-one smoothing): which pitch
    class a level-0 code stands for, learnt from where the real bass (always on the root) uses it."""
    counts = np.ones((V, 12))
    for song, codes in zip(songs, real_codes):
        for t, c in enumerate(codes[0].tolist()):
            b = int(t / fps // song["gt"]["bar_seconds"])
            if b < len(song["gt"]["chords"]):
                counts[c, listening.chord_root(song["gt"]["chords"][b])] += 1
    return np.log(counts / counts.sum(1, keepdims=True))


def token_chord_root(codes: torch.Tensor, gt: dict, table: np.ndarray, fps: float) -> float:
    """Share of bars (as chord_root_agreement counts them) whose level-0 codes, read through
    ``table`` (summed log-probabilities over the bar's frames), name the chord root: a token-level
    reading like harmony_probe.py's, next to the audio's."""
    per_bar = int(round(gt["bar_seconds"] * fps))
    c = codes[0].numpy()
    hits, n = 0, 0
    for b, name in enumerate(gt["chords"]):
        seg = c[b * per_bar:(b + 1) * per_bar]
        if len(seg) < per_bar // 2:
            break
        n += 1
        hits += int(np.argmax(table[seg].sum(0)) == listening.chord_root(name))
    return hits / max(n, 1)


def bar_pitch_diagnostics(stem: np.ndarray, sr: int, gt: dict) -> dict:
    """Diagnostics beside listening.chord_root_agreement (same bars, same bass-register reading):
    share of bars whose bass pitch class is the key's tonic, is a tone of the bar's triad, and the
    share of bars whose chord root IS the tonic (what a bass droning on the tonic would score)."""
    from stemgen.evaluation import dsp

    x = dsp.prepare(stem, sr)
    bar = int(round(gt["bar_seconds"] * dsp.SR))
    n = tonic = tone = root_is_tonic = 0
    for b, name in enumerate(gt["chords"]):
        seg = x[b * bar:(b + 1) * bar]
        if len(seg) < bar // 2:
            break
        n += 1
        root = listening.chord_root(name)
        root_is_tonic += int(root == gt["tonic"])
        if np.sqrt((seg ** 2).mean()) < 1e-4:
            continue
        pc = int(np.argmax(dsp.bass_chroma(seg)))
        tonic += int(pc == gt["tonic"])
        tone += int((pc - root) % 12 in (0, 3 if name.endswith("m") else 4, 7))
    n = max(n, 1)
    return {"bass_on_tonic": tonic / n, "bass_on_chord_tone": tone / n, "root_is_tonic": root_is_tonic / n}


def stats(xs) -> tuple[float, float]:
    xs = np.asarray(xs, dtype=float)
    se = float(xs.std(ddof=1) / np.sqrt(len(xs))) if len(xs) > 1 else float("nan")
    return float(xs.mean()), se


def run_variant(engine: Engine, data: list[dict], prepared: list[dict], inst: str, name: str, opts: dict,
                steps, seed: int, log, table: np.ndarray | None = None) -> dict:
    t0 = time.perf_counter()
    mode = opts.get("mode", "gen")
    levels = opts.get("levels")
    deaf = bool(opts.get("deaf", 0))
    base = opts.get("base", "paper")
    sampling = dict(listening.setting_options(base), steps=tuple(steps))
    sampling.update({k: v for k, v in opts.items() if k not in SPECIAL})
    csr = engine.codec.cfg.sample_rate
    stems, tokens_out = [], []
    if mode == "ceiling":
        stems = [listening.round_trip(engine.codec, song["stems"][inst], song["sr"], levels) for song in data]
        tokens_out = [p["real"][inst] for p in prepared]
    else:
        handles = []
        for i, (song, prep) in enumerate(zip(data, prepared)):
            ctx_prep = prepared[(i + 1) % len(data)] if deaf else prep
            real = prep["real"][inst]               # [Q, T] the real stem's codes
            target = None
            if mode == "l0model":
                target = real.clone()
                target[0] = engine.mask_id
            elif mode == "l0real":
                target = torch.full_like(real, engine.mask_id)
                target[0] = real[0]
            elif mode != "gen":
                raise SystemExit(f"{name}: unknown mode {mode!r}")
            ctx = ctx_prep["ctx"][inst]
            T = min(ctx.shape[-1], real.shape[-1])
            handles.append(engine.submit(ctx[..., :T], inst, target=None if target is None else target[:, :T],
                                         seed=seed + i, **sampling))
        for i, h in enumerate(handles):
            tokens = h.result()
            tokens_out.append(tokens)
            x = prepared[i]["x"][inst]
            stems.append(engine.decode(tokens[:levels] if levels else tokens, x).stem[0])
    gen_s = time.perf_counter() - t0
    rows = [{"song": song["name"], **listening.score(stem, csr, song["gt"], inst)} for song, stem in zip(data, stems)]
    if inst == "bass":
        for row, song, stem in zip(rows, data, stems):
            row.update(bar_pitch_diagnostics(stem, csr, song["gt"]))
    if table is not None and inst == "bass":
        fps = engine.codec.cfg.frame_rate
        for row, song, tok in zip(rows, data, tokens_out):
            row["chord_root_tokens"] = token_chord_root(tok, song["gt"], table, fps)
    wall = time.perf_counter() - t0
    summary = {}
    for key in ("chord_root", "chord_root_tokens", "bass_on_tonic", "bass_on_chord_tone", "root_is_tonic",
                "beat_align", "tempo_agree", "grid_chance"):
        if key in rows[0]:
            m, se = stats([r[key] for r in rows])
            summary[key] = m
            summary[key + "_se"] = se
    entry = {"instrument": inst, "variant": name, "options": {k: list(v) if isinstance(v, tuple) else v
                                                              for k, v in opts.items()},
             "sampling": {k: list(v) if isinstance(v, tuple) else v for k, v in sampling.items()},
             "songs": len(data), "seed": seed, "summary": summary, "seconds_generate_decode": round(gen_s, 1),
             "seconds": round(wall, 1), "per_song": rows}
    log(f"{inst} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if not k.endswith("_se"))
        + f" ({wall:.0f} s)")
    return entry


def key_of(e: dict) -> tuple:
    return (e["instrument"], e["variant"], e["songs"], e["clip_seconds"])


def paired(entries: list[dict], e: dict, ref: str, metric: str) -> str:
    """e's metric minus the reference variant's, paired over songs (same songs, same seeds)."""
    same = lambda x: (x["instrument"], x["songs"], x["clip_seconds"]) == (e["instrument"], e["songs"], e["clip_seconds"])  # noqa: E731
    r = next((x for x in entries if x["variant"] == ref and same(x)), None)
    if r is None or r is e or metric not in e["summary"]:
        return "-"
    a = {row["song"]: row[metric] for row in e["per_song"]}
    b = {row["song"]: row[metric] for row in r["per_song"]}
    d = [a[s] - b[s] for s in a if s in b]
    m, se = stats(d)
    return f"{m:+.3f} ± {se:.3f}"


def markdown(doc: dict) -> str:
    entries = doc["entries"]
    lines = [f"# Listening knobs: model {doc.get('model', 'demo')}, the songs of {Path(doc['corpus']).name} "
             "(a toy-band corpus from `stemgen make-corpus`), first {s} s",
             "",
             f"CPU: {doc['cpu']}; torch {doc['torch']}; fp32, {doc.get('threads', 1)} thread(s). "
             "Mean over songs ± standard error (std/sqrt(n)); Δ: paired difference "
             "from the `paper` row of the same instrument and song count (same songs, same seeds). "
             "Chance: chord root 1/12 = 0.083; grid: see `grid_chance`.",
             "",
             "Diagnostics (bass): *tokens*: the chord root read from the level-0 codes through a code -> root table "
             "learnt from the real bass of the corpus' other 20 songs (`--token-readout`; like "
             "harmony_probe.py's reading; real bass: 0.98); *chord tone*: share of bars whose bass pitch class is "
             "in the bar's triad; *tonic*: on the key's tonic (the songs' chord root is the tonic on "
             "`root_is_tonic` of the bars).",
             "",
             "| stem | variant | songs | options | chord root | Δ chord root vs paper | chord root (tokens) | "
             "chord tone | tonic | grid | Δ grid vs paper | tempo within 4% | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    secs = sorted({e["clip_seconds"] for e in entries})
    lines[0] = lines[0].replace("{s}", "/".join(f"{s:g}" for s in secs))
    order = list(VARIANTS)
    rank = lambda i_e: (i_e[1]["songs"], i_e[1]["instrument"] != "bass", i_e[1]["instrument"],  # noqa: E731
                        order.index(i_e[1]["variant"]) if i_e[1]["variant"] in order else len(order) + i_e[0])
    for _, e in sorted(enumerate(entries), key=rank):
        s = e["summary"]
        opts = ",".join(f"{k}={'/'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in e["options"].items())
        cr = f"{s['chord_root']:.3f} ± {s['chord_root_se']:.3f}" if "chord_root" in s else "-"
        f3 = lambda k: f"{s[k]:.3f}" if k in s else "-"  # noqa: E731
        lines.append(f"| {e['instrument']} | {e['variant']} | {e['songs']} | {opts or '(paper, 12/6/4/4)'} | {cr} | "
                     f"{paired(entries, e, 'paper', 'chord_root')} | {f3('chord_root_tokens')} | "
                     f"{f3('bass_on_chord_tone')} | {f3('bass_on_tonic')} | "
                     f"{s['beat_align']:.3f} ± {s['beat_align_se']:.3f} | {paired(entries, e, 'paper', 'beat_align')} | "
                     f"{s['tempo_agree']:.2f} | {e['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="variant names or NAME:key=value,... (see the module doc)")
    ap.add_argument("--corpus", required=True, type=Path, help="held-out toy-band corpus (make-corpus --seed 1000)")
    ap.add_argument("--songs", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--steps", default="12,6,4,4", help="default steps per level (Table 3's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--instruments", default="bass", help="comma-separated: bass, drums")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--token-readout", action="store_true",
                    help="also read the chord root from the level-0 tokens (bass), through a code -> root table "
                    "learnt from the real bass of the corpus' songs AFTER the --songs evaluated")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "listening-knobs.json")
    ap.add_argument("--md", type=Path, default=ROOT / "bench" / "listening-knobs.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    variants = [parse_variant(v) for v in args.variants]
    instruments = tuple(args.instruments.split(","))
    steps = tuple(int(s) for s in args.steps.split(","))

    t0 = time.perf_counter()
    engine = Engine.from_pretrained(args.model, device="cpu", dtype="float32")   # as `stemgen table3`
    data = listening.heldout_songs(args.corpus, args.songs, args.seconds, instruments=instruments)
    prepared = []
    for song in data:
        p = {"x": {}, "ctx": {}, "real": {}}
        for inst in instruments:
            p["x"][inst], p["ctx"][inst] = engine.prepare_context(song["contexts"][inst][None], song["sr"])
            p["real"][inst] = engine.encode(song["stems"][inst][None], song["sr"])[1]
        prepared.append(p)
    table = None
    if args.token_readout and "bass" in instruments:
        rest = listening.heldout_songs(args.corpus, 10 ** 6, args.seconds, instruments=("bass",))[len(data):]
        if not rest:
            raise SystemExit("--token-readout needs corpus songs beyond --songs to learn the code table from")
        table = code_root_table(rest, [engine.encode(s["stems"]["bass"][None], s["sr"])[1] for s in rest],
                                engine.codec.cfg.frame_rate, engine.config.lm.codebook_size)
        log(f"code -> root table from the real bass of {len(rest)} other songs")
    log(f"{len(data)} songs, {args.seconds:g} s, prepared in {time.perf_counter() - t0:.1f} s")

    doc = json.loads(args.json.read_text()) if args.json.is_file() else {"entries": []}
    doc.update(cpu=cpu_name(), cpu_features=cpu_features(), torch=torch.__version__, corpus=str(args.corpus), model=args.model,
               threads=torch.get_num_threads())
    try:
        for inst in instruments:
            for name, opts in variants:
                e = run_variant(engine, data, prepared, inst, name, opts, steps, args.seed, log, table)
                e["clip_seconds"] = args.seconds
                e["command"] = " ".join(sys.argv)
                doc["entries"] = [x for x in doc["entries"] if key_of(x) != key_of(e)] + [e]
                args.json.write_text(json.dumps(doc, indent=1))
                args.md.write_text(markdown(doc))
    finally:
        engine.close()
    log(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
