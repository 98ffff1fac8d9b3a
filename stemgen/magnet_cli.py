"""`stemgen generate --text ...`: the MAGNeT front door of the generate command (stemgen/cli.py parses
the options; this runs them): one prompt (with variations, a continued prompt or an inpainted take,
any length), or a file of prompts in one batch."""
from __future__ import annotations

import time
from pathlib import Path

from .cli_common import _model_dir, _numbered, _say, check_seed_range, console, err_console, fail, run_guarded
from .engine.fileutil import read_bounded

MAX_PROMPTS = 1000


def read_prompts(text: str) -> tuple[list[str], bool]:
    """--text value -> (prompts, from a file). '@FILE': one prompt per non-empty line."""
    if not text.startswith("@"):
        return [text], False
    path = Path(text[1:])
    try:
        lines = [ln.strip() for ln in read_bounded(path, 1 << 20).decode("utf-8").splitlines()]
    except ValueError as e:
        if isinstance(e, UnicodeDecodeError):
            raise ValueError(f"--text {text}: the prompt file is not UTF-8 text") from None
        raise ValueError(f"--text {text}: the prompt file is larger than 1 MB") from None
    except OSError as e:
        raise ValueError(f"--text {text}: cannot read the prompt file ({e.strerror or e})") from None
    prompts = [ln for ln in lines if ln]
    if not prompts:
        raise ValueError(f"--text {text}: the prompt file has no prompts (one per line)")
    if len(prompts) > MAX_PROMPTS:
        raise ValueError(f"--text {text}: {len(prompts)} prompts; at most {MAX_PROMPTS} per run")
    return prompts, True


def generate_text(text: str, out: Path, model: str, seconds, keep, regenerate, window, overlap, mix, variations: int,
                  device: str, dtype, bits: str, knobs: dict) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .engine import Engine
    from .engine.audio import SUBTYPES, AudioError, check_distinct, check_output_path, read_audio, write_audio_set
    from .workflows import parse_regions

    if bits not in SUBTYPES:
        fail(f"--bits must be 16, 24 or float, got {bits!r}")
    if mix is not None:
        fail("--mix applies to StemGen models (context + stem); a MAGNeT generation is the whole piece")
    if regenerate and not keep:
        fail("--regenerate needs --keep TAKE (the audio whose ranges are regenerated)")

    def prepare():
        prompts, batch = read_prompts(text)
        if not 1 <= variations <= 64:
            raise AudioError(f"--variations must be between 1 and 64, got {variations}")
        if batch:
            if out.exists() and not out.is_dir():
                raise ValueError(f"--out {out}: a prompt file writes a folder; give a folder path")
            if not out.parent.is_dir():
                raise ValueError(f"--out {out}: parent folder {out.parent} does not exist")
            width = len(str(len(prompts)))
            outs = [_numbered(out / f"{k + 1:0{width}d}.wav", i, variations)
                    for k in range(len(prompts)) for i in range(variations)]
        else:
            outs = [check_output_path(_numbered(out, i, variations), bits) for i in range(variations)]
        check_distinct([keep] if keep else [], outs)
        regions = parse_regions(regenerate)
        take = read_audio(keep) if keep else (None, None)
        engine = Engine.from_pretrained(_model_dir(model), device=device, dtype=dtype)
        engine.require_kind("magnet")
        engine.require_codec()
        sampling = engine.sampling(**knobs)
        from .engine.request import check_steps
        check_steps(sampling.steps, engine.config.lm.n_q)
        for p in prompts:
            engine.text_encoder.tokens(p)   # empty or over-long prompts: one line, before any work
        if seconds is not None and not 0 < seconds <= 3600:
            raise ValueError(f"--seconds must be in (0, 3600], got {seconds}")
        return engine, sampling, prompts, batch, outs, take, regions

    engine, sampling, prompts, batch, outs, (take, take_sr), regions = run_guarded(prepare)
    fps = engine.codec.cfg.frame_rate
    T = engine.frames(seconds) if seconds else engine.segment_frames()
    win, ovl = run_guarded(engine.window_frames, window, overlap)
    plan = run_guarded(engine.windows, T, win, ovl)
    check_seed_range(sampling.seed, variations, len(plan), 1000)
    if len(plan) > 1:
        _say("note:", "bold", f"{T / fps:.1f} s: {len(plan)} windows of {(plan[0][1] - plan[0][0]) / fps:.1f} s")
    total = sum(sampling.steps) * len(plan) * len(prompts) * variations
    t0 = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as bar:
        task = bar.add_task("decoding", total=total)
        results = run_guarded(engine.generate_text, prompts, seconds, variations, take, take_sr, regions,
                              progress=lambda q, t, n: bar.advance(task), sampling=sampling, window=win, overlap=ovl)
    wall = time.perf_counter() - t0
    if batch:
        out.mkdir(exist_ok=True)
    run_guarded(write_audio_set, [(o, r.stem, r.sample_rate) for o, r in zip(outs, results)], bits)
    audio_s = sum(r.stem.shape[1] / r.sample_rate for r in results)
    where = out if batch else ", ".join(str(o) for o in outs)
    console.print(f"wrote {where}: {audio_s:.2f} s of audio ({len(results)} piece(s)) in {wall:.2f} s "
                  f"(real-time factor {wall / audio_s:.2f}, {audio_s / wall:.2f}x real time)", highlight=False,
                  markup=False)
