"""Does the model listen? Table 3 of the paper at toy scale (`stemgen table3`).

For held-out toy-band songs (ground-truth tempo, meter and chords per bar in metadata.yaml), a bass
and a drums stem are generated for each song's context (the other stems mixed) under five settings:

  naive      no guidance, no causal bias (w_c = w_s = 0)
  paper      multi-source CFG 3.0 / 3.0, causal bias 0.1
  default    the model's own sampling defaults (its config.json; the paper's unless it says otherwise)
  deaf       the default settings with the context of ANOTHER song (the model cannot listen to this one)
  ceiling    the real stem through the codec (encode + decode)

and scored against the song's ground truth:

  chord_root   bass only: share of bars whose strongest bass-register pitch class is the bar's chord root
  beat_align   share of the stem's onsets within 40 ms of the song's eighth-note grid
               (``grid_chance``: the share a uniformly random onset would reach)
  tempo_agree  share of stems whose estimated tempo is within 4% of the song's
  MIRDD        stem + context and stem alone, against the real stems (``stemgen eval``'s definition)
  FAD          log-mel embedder, against the real stems
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import dsp

SETTINGS = ("naive", "paper", "default", "deaf", "ceiling")
TOLERANCE_S = 0.04


def chord_root(name: str) -> int:
    """Pitch class of a metadata chord name ("F#m" -> 6)."""
    return dsp.PITCH_NAMES.index(name[:-1] if name.endswith("m") else name)


def chord_root_agreement(stem: np.ndarray, sr: int, gt: dict) -> float:
    """Share of the song's bars (within the stem's length) where the bass register's strongest pitch
    class is the ground-truth chord root."""
    x = dsp.prepare(stem, sr)
    bar = int(round(gt["bar_seconds"] * dsp.SR))
    hits, n = 0, 0
    for b, name in enumerate(gt["chords"]):
        seg = x[b * bar:(b + 1) * bar]
        if len(seg) < bar // 2:
            break
        n += 1
        if np.sqrt((seg ** 2).mean()) < 1e-4:
            continue  # silence plays no root
        root = chord_root(name)
        hits += int(np.argmax(dsp.bass_chroma(seg)) == root)
    return hits / max(n, 1)


def beat_alignment(stem: np.ndarray, sr: int, gt: dict) -> tuple[float, float]:
    """(share of onsets within TOLERANCE_S of the eighth-note grid, the share for random onsets)."""
    x = dsp.prepare(stem, sr)
    onsets = dsp.onset_times(dsp.onset_envelope(dsp.stft_mag(x)))
    step = 60.0 / gt["tempo"] / 2
    chance = min(1.0, 2 * TOLERANCE_S / step)
    if len(onsets) == 0:
        return 0.0, chance
    dist = np.abs(onsets / step - np.round(onsets / step)) * step
    return float((dist <= TOLERANCE_S).mean()), chance


def tempo_agreement(stem: np.ndarray, sr: int, gt: dict, tol: float = 0.04) -> float:
    x = dsp.prepare(stem, sr)
    bpm = dsp.tempo(dsp.onset_envelope(dsp.stft_mag(x)))
    return float(np.isfinite(bpm) and abs(bpm - gt["tempo"]) / gt["tempo"] <= tol)


def score(stem: np.ndarray, sr: int, gt: dict, instrument: str) -> dict:
    align, chance = beat_alignment(stem, sr, gt)
    out = {"beat_align": align, "grid_chance": chance, "tempo_agree": tempo_agreement(stem, sr, gt)}
    if instrument == "bass":
        out["chord_root"] = chord_root_agreement(stem, sr, gt)
    return out


def summarise(rows: list[dict]) -> dict:
    """Mean of every numeric field over rows."""
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float))})
    return {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}


def markdown_table(results: dict) -> str:
    """results[instrument][setting] = summary dict -> one Markdown table."""
    cols = [("chord_root", "chord-root agreement"), ("beat_align", "onsets on the grid"),
            ("tempo_agree", "tempo within 4%"), ("mirdd_with_context", "MIRDD (stem + context)"),
            ("mirdd_stem", "MIRDD (stem alone)"), ("fad_logmel", "FAD (log-mel)")]
    lines = ["| stem | setting | " + " | ".join(c[1] for c in cols) + " |",
             "| --- | --- | " + " | ".join("---" for _ in cols) + " |"]
    for inst, by_setting in results.items():
        for setting in SETTINGS:
            if setting not in by_setting:
                continue
            s = by_setting[setting]
            cells = [f"{s[k]:.3f}" if k in s else "-" for k, _ in cols]
            lines.append(f"| {inst} | {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def heldout_songs(corpus: str | Path, n: int, seconds: float | None,
                  instruments: tuple[str, ...] = ("bass", "drums")) -> list[dict]:
    """The first n tracks of a toy-band corpus: context and real stem per instrument (inst_class,
    any case), cropped to ``seconds`` (None: whole)."""
    from .corpus import load_track

    if not Path(corpus).is_dir():
        raise ValueError(f"{corpus}: no such folder (make a corpus with `stemgen make-corpus`)")
    out = []
    for track in sorted(p for p in Path(corpus).iterdir() if (p / "metadata.yaml").is_file())[:n]:
        meta, stems = load_track(track)
        if "ground_truth" not in meta:
            raise ValueError(f"{track}/metadata.yaml: no ground_truth (not a toy-band track from `stemgen make-corpus`)")
        sr = next(iter(stems.values()))[1]
        L = None if seconds is None else int(seconds * sr)
        by_class = {meta["stems"][sid]["inst_class"].lower(): sid for sid in stems}
        song = {"name": track.name, "sr": sr, "gt": meta["ground_truth"], "stems": {}, "contexts": {}}
        for inst in instruments:
            if inst.lower() not in by_class:
                raise ValueError(f"{track}: no {inst} stem (a toy-band track has bass, drums, synth pad, synth lead)")
            sid = by_class[inst.lower()]
            song["stems"][inst] = stems[sid][0][:L]
            song["contexts"][inst] = sum(a[:L] for s, (a, _) in stems.items() if s != sid)
        out.append(song)
    return out


def setting_options(setting: str) -> dict:
    """Sampler overrides of a Table 3 setting on top of the model's defaults (steps and seed apart)."""
    if setting == "naive":
        return dict(guidance="none", w_confidence=0.0, w_causal=0.0)
    if setting == "paper":
        return dict(guidance="multi", cfg_context=3.0, cfg_instrument=3.0, w_confidence=0.1, w_causal=0.1)
    return {}   # default and deaf: the model's own


INSTRUMENTS = ("bass", "drums")


def run_table3(engine, corpus: str | Path, out: str | Path, songs: int = 40, seconds: float = 10.0,
               steps=(20, 10, 10, 10), seed: int = 0, log=print, instruments=INSTRUMENTS,
               settings=SETTINGS) -> dict:
    """Generate, write and score every setting (or the ``settings`` given, for the ``instruments``
    given); returns {"per_song": [...], "table": {...}}. Files: OUT/<setting>/<instrument>/<track>.wav,
    OUT/real/..., OUT/context/... (32 kHz codec rate), and OUT/spectrograms.png when both stems and
    the default and deaf settings ran."""
    bad = [x for x in instruments if x not in INSTRUMENTS] + [x for x in settings if x not in SETTINGS]
    if bad or not instruments or not settings:
        raise ValueError(f"table3: unknown or no stems/settings {bad}; stems are {', '.join(INSTRUMENTS)}, "
                         f"settings {', '.join(SETTINGS)}")
    import soundfile as sf
    import soxr

    from .run import evaluate

    out = Path(out)
    data = heldout_songs(corpus, songs, seconds)
    if len(data) < 2:
        raise ValueError(f"{corpus}: need at least 2 toy-band tracks")
    csr = engine.codec.cfg.sample_rate
    per_song, results = [], {}
    for inst in instruments:
        for song in data:
            for kind, audio in (("real", song["stems"][inst]), ("context", song["contexts"][inst])):
                p = out / kind / inst / f"{song['name']}.wav"
                p.parent.mkdir(parents=True, exist_ok=True)
                sf.write(p, soxr.resample(audio, song["sr"], csr).astype(np.float32), csr, subtype="FLOAT")
        for setting in settings:
            folder = out / setting / inst
            folder.mkdir(parents=True, exist_ok=True)
            if setting == "ceiling":
                stems = []
                for song in data:
                    stems.append(round_trip(engine.codec, song["stems"][inst], song["sr"]))
            else:
                handles = []
                for i, song in enumerate(data):
                    ctx_song = data[(i + 1) % len(data)] if setting == "deaf" else song
                    ctx = ctx_song["contexts"][inst]
                    handles.append(engine.submit_audio(ctx[None], inst, ctx_song["sr"], seed=seed + i,
                                                       steps=tuple(steps), **setting_options(setting)))
                stems = []
                for i, h in enumerate(handles):
                    stems.append(h.result().stem[0])
                    log(f"{inst} {setting}: {i + 1}/{len(data)}")
            rows = []
            for song, stem in zip(data, stems):
                sf.write(folder / f"{song['name']}.wav", stem, csr, subtype="FLOAT")
                row = {"song": song["name"], "instrument": inst, "setting": setting,
                       **score(stem, csr, song["gt"], inst)}
                rows.append(row)
            per_song += rows
            summary = summarise(rows)
            with_ctx = evaluate(folder, out / "real" / inst, out / "context" / inst)
            alone = evaluate(folder, out / "real" / inst)
            summary.update(mirdd_with_context=with_ctx["mirdd"], mirdd_stem=alone["mirdd"], fad_logmel=alone["fad"])
            results.setdefault(inst, {})[setting] = summary
            log(f"{inst} {setting}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    result = {"per_song": per_song, "table": results, "songs": len(data), "seconds": seconds,
              "steps": list(steps), "seed": seed}
    if set(instruments) != set(INSTRUMENTS) or not {"default", "deaf"} <= set(settings):
        return result   # the figure shows both stems, default and deaf
    import soundfile as sf_read

    first = data[0]["name"]
    load = lambda kind, inst: sf_read.read(out / kind / inst / f"{first}.wav", dtype="float32")[0]  # noqa: E731
    spectrogram_figure(out / "spectrograms.png", [
        ("context (drums + pad + lead)", load("context", "bass"), csr), ("real bass", load("real", "bass"), csr),
        ("generated bass (the model's default settings)", load("default", "bass"), csr),
        ("generated bass (deaf: another song's context)", load("deaf", "bass"), csr),
        ("real drums", load("real", "drums"), csr),
        ("generated drums (the model's default settings)", load("default", "drums"), csr)],
        title=f"held-out song {first}: {data[0]['gt']['key']}, {data[0]['gt']['tempo']:.0f} BPM, "
              f"chords {' '.join(data[0]['gt']['chords'][:4])}")
    return result


def round_trip(codec, audio: np.ndarray, sr: int, levels: int | None = None) -> np.ndarray:
    """``audio`` through an engine codec (encode, the first ``levels`` RVQ levels or all, decode),
    at the codec's sample rate."""
    import soxr
    import torch

    x = soxr.resample(np.asarray(audio, dtype=np.float32), sr, codec.cfg.sample_rate).astype(np.float32)
    with torch.no_grad():
        codes = codec.encode(torch.from_numpy(x)[None, None])
        return codec.decode(codes[:, :levels] if levels else codes)[0, 0, :len(x)].numpy()


def chord_roots_read(audio: np.ndarray, sr: int, gt: dict) -> tuple[int, int]:
    """(bars whose chord root, read by triad templates on the chroma, is the true one; bars read)."""
    chroma = dsp.chroma(dsp.stft_mag(dsp.prepare(audio, sr)))
    got = dsp.chords(chroma, gt["bar_seconds"] * dsp.SR / dsp.HOP)
    truth = [chord_root(n) for n in gt["chords"]]
    return sum(int(g[0] == r) for g, r in zip(got, truth)), min(len(got), len(truth))


def codec_harmony(codec, corpus: str | Path, songs: int = 10) -> dict[str, float]:
    """Does a codec keep the chords a bass should follow? For the first ``songs`` tracks of a toy-band
    corpus: the share of bars whose chord root is read right from the pad and from a bass's context
    (the other stems mixed), as rendered and after a round trip through ``codec`` (all levels; the
    context also from the first level alone), and the bass's chord-root agreement after the round
    trip (Table 3's ceiling, mean over songs). An LM cannot follow chords its context tokens lack."""
    data = heldout_songs(corpus, songs, None, instruments=("bass", "synth pad"))
    if not data:
        raise ValueError(f"{corpus}: no Track folders with a metadata.yaml (make a corpus with `stemgen make-corpus`)")
    hits: dict[str, list[int]] = {}
    bass = []
    csr = codec.cfg.sample_rate
    for song in data:
        sr, gt, pad = song["sr"], song["gt"], song["stems"]["synth pad"]
        context = song["contexts"]["bass"]
        context = context / max(np.abs(context).max() / 0.99, 1.0)  # as `stemgen train` tokenises mixes
        for name, x, x_sr in (("pad", pad, sr), ("pad through the codec", round_trip(codec, pad, sr), csr),
                              ("context", context, sr), ("context through the codec", round_trip(codec, context, sr), csr),
                              ("context, first level only", round_trip(codec, context, sr, 1), csr)):
            h, n = chord_roots_read(x, x_sr, gt)
            hit = hits.setdefault(name, [0, 0])
            hit[0] += h
            hit[1] += n
        bass.append(chord_root_agreement(round_trip(codec, song["stems"]["bass"], sr), csr, gt))
    out = {name: h / max(n, 1) for name, (h, n) in hits.items()}
    out["bass through the codec (ceiling)"] = float(np.mean(bass))
    out["bars"] = hits["pad"][1]
    return out


def spectrogram_figure(png: str | Path, rows: list[tuple[str, np.ndarray, int]], title: str = "") -> None:
    """Log-magnitude spectrograms (0-2 kHz), one row per (label, mono audio, sr)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 1.6 * len(rows)), sharex=True)
    for ax, (label, audio, sr) in zip(np.atleast_1d(axes), rows):
        x = dsp.prepare(audio, sr)
        mag = dsp.stft_mag(x)
        f = np.fft.rfftfreq(dsp.N_FFT, 1 / dsp.SR)
        keep = f <= 2000
        db = 20 * np.log10(mag[:, keep].T + 1e-5)
        ax.imshow(db, origin="lower", aspect="auto", cmap="magma", vmin=db.max() - 80, vmax=db.max(),
                  extent=(0, len(x) / dsp.SR, 0, 2))
        ax.set_ylabel("kHz")
        ax.set_title(label, fontsize=9, loc="left")
    np.atleast_1d(axes)[-1].set_xlabel("seconds")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png = Path(png)
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(png)
