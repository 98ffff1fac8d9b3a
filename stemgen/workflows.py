"""What `stemgen generate` does beyond one stem: regenerating a region of a take or continuing it,
layering instrument after instrument, and whole folders through the batched scheduler.
Each function takes a loaded Engine and a SamplingConfig; outputs are written all or nothing."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .engine.audio import (AUDIO_EXTS, AudioError, check_distinct, check_output_path, peak_safe, read_audio, splice,
                           write_audio_set)
from .engine.fileutil import read_bounded

SEAM_FADE_S = 0.02   # crossfade at the seams of a regenerated region


def parse_regions(text: str | None) -> list[tuple[float, float]]:
    """'4.0:8.0,10:12' -> [(4.0, 8.0), (10.0, 12.0)]."""
    if not text:
        return []
    out = []
    for part in text.split(","):
        try:
            a, b = (float(v) for v in part.split(":"))
        except ValueError:
            raise AudioError(f"--regenerate {part!r}: give START:END in seconds, e.g. 4.0:8.0") from None
        if not (np.isfinite(a) and np.isfinite(b)):
            raise AudioError(f"--regenerate {part!r}: not finite")
        out.append((a, b))
    return out


def edit_take(engine, x: np.ndarray, ctx, take_path: Path, context_sr: int, regions, instrument, sampling,
              progress=None, variations: int = 1):
    """Regenerate ``regions`` of the take (or continue it to the context's length): ``variations``
    of the edit, seeds seed, seed+1, ... decoded in one batch. Returns ([Generation per
    variation], keep mask over samples)."""
    take, sr = read_audio(take_path)
    if sr != context_sr:
        raise AudioError(f"{take_path}: the take is at {sr} Hz but the context at {context_sr} Hz; "
                         "give both at the same rate")
    if take.shape[1] > int(round(x.shape[1] * sr / engine.codec.cfg.sample_rate)) + sr // 100:
        raise AudioError(f"{take_path}: the take ({take.shape[1] / sr:.2f} s) is longer than the context "
                         f"({x.shape[1] / engine.codec.cfg.sample_rate:.2f} s)")
    take_x, take_codes = engine.encode(take, sr)
    target = engine.partial_target(take_codes, ctx.shape[-1], regions)
    gens = engine.generate_from_context(x, ctx, instrument, progress=progress, sampling=sampling, target=target,
                                        variations=variations)
    # outside the regenerated ranges the take itself is kept (crossfaded at the seams)
    csr = engine.codec.cfg.sample_rate
    keep = np.ones(gens[0].stem.shape[1], dtype=bool)
    for a, b in regions:
        keep[int(a * csr): int(b * csr)] = False
    keep[take_x.shape[1]:] = False
    for gen in gens:
        gen.stem, gen.gain = peak_safe(splice(gen.stem, take_x, keep, int(SEAM_FADE_S * csr)))
    return gens, keep


def layer(engine, x: np.ndarray, instruments: list[str], sampling, progress=None):
    """Generate each instrument for the mix so far, then add it to the mix. Returns
    ([(instrument, stem)], final mix); all at the codec's rate."""
    mix = x.astype(np.float32)
    stems = []
    for inst in instruments:
        _, ctx = engine.prepare_context(mix, engine.codec.cfg.sample_rate)
        gen = engine.generate_from_context(mix, ctx, inst, progress=progress, sampling=sampling)[0]
        stems.append((inst, gen.stem))
        mix = mix + gen.stem
    return stems, mix


MAX_LIST_BYTES = 4 << 20   # a text list of inputs: 4 MB is tens of thousands of paths


def collect_inputs(src: Path) -> list[Path]:
    """A folder's audio files (recursive, sorted) or the paths listed in a text file."""
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTS)
        if not files:
            raise AudioError(f"{src}: no audio files ({', '.join(sorted(AUDIO_EXTS))}) in this folder")
        return files
    try:
        text = read_bounded(src, MAX_LIST_BYTES).decode("utf-8")
    except OSError as e:
        raise AudioError(f"{src}: cannot be read ({e.strerror or e}); give an audio folder or a text file "
                         "listing audio files") from None
    except UnicodeDecodeError:
        raise AudioError(f"{src}: not a UTF-8 text list of audio files (one path per line) nor a folder") from None
    except ValueError:
        raise AudioError(f"{src}: a list of files larger than {MAX_LIST_BYTES >> 20} MB; split it") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not lines:
        raise AudioError(f"{src}: the list names no files")
    return [(src.parent / ln) if not Path(ln).is_absolute() else Path(ln) for ln in lines]


def folder_outputs(src: Path, files: list[Path], out_dir: Path):
    """-> (inputs, their outputs under ``out_dir``, [(input, why it is skipped)]). A folder's outputs
    mirror its tree; a file in it that is a link leading outside the folder is reported and skipped
    (the rest run). A list's outputs are OUT/<name>.wav. An output that is an input is refused."""
    out_dir = out_dir.resolve()
    rejected = []
    if src.is_dir():
        root = src.resolve()
        if out_dir == root or root in out_dir.parents:
            raise AudioError(f"--out {out_dir} is inside the input folder {root}; choose an output folder elsewhere")
        kept, names = [], []
        for p in files:
            try:
                rel = p.resolve().relative_to(root)
            except (ValueError, OSError, RuntimeError):
                rejected.append((p, f"skipped {p}: a link that leads outside the input folder {src}"))
                continue
            kept.append(p)
            names.append(out_dir / rel.with_suffix(".wav"))
        files = kept
    else:
        names = [out_dir / (p.stem + ".wav") for p in files]
        if len(set(names)) != len(names):
            raise AudioError(f"{src}: two listed files share a name; outputs would collide")
    check_distinct(files, names, files)    # a listed input at its own output path would be overwritten (--force)
    return files, names, rejected


def run_folder(engine, files: list[Path], outs: list[Path], instrument: str, sampling, bits: str, force: bool,
               log, progress=None, window: int = 8, rejected=()) -> dict:
    """Every file through the batched scheduler (at most ``window`` decoded contexts in memory);
    a bad file is reported and skipped (``rejected``: [(file, why)] already refused by
    folder_outputs, reported and counted alike). Returns a summary."""
    todo = [(f, o) for f, o in zip(files, outs) if force or not o.exists()]
    skipped = len(files) - len(todo)
    done, failed, seconds = 0, [], 0.0
    for f, why in rejected:
        failed.append((f, why))
        log(why)
    t0 = time.perf_counter()
    pending: list[tuple[Path, Path, object]] = []

    def finish(item):
        nonlocal done, seconds
        f, o, h = item
        try:
            gen = h.result()
            o.parent.mkdir(parents=True, exist_ok=True)
            write_audio_set([(check_output_path(o, bits), gen.stem, gen.sample_rate)], bits)
            done += 1
            seconds += gen.stem.shape[1] / gen.sample_rate
        except (ValueError, OSError) as e:
            failed.append((f, str(e)))
            log(f"skipped {f}: {e}")
        if progress:
            progress(done + len(failed), len(todo))

    for f, o in todo:
        try:
            audio, sr = read_audio(f)
            h = engine.submit_audio(audio, instrument, sr, sampling=sampling)
        except ValueError as e:
            failed.append((f, str(e)))
            log(f"skipped {f}: {e}")
            continue
        pending.append((f, o, h))
        if len(pending) >= window:
            finish(pending.pop(0))
    while pending:
        finish(pending.pop(0))
    wall = time.perf_counter() - t0
    return {"files": len(files) + len(rejected), "written": done, "skipped_existing": skipped, "failed": len(failed),
            "audio_s": seconds, "wall_s": wall, "audio_s_per_s": seconds / wall if wall > 0 else 0.0,
            "failures": [(str(f), e) for f, e in failed]}
