"""`stemgen eval`: FAD and MIRDD between a folder of generated stems and a folder of reference
stems, optionally each summed with its context (matched by file name) for MIRDD."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import dsp
from .fad import LogMelEmbedder, fad
from .mirdd import mirdd

AUDIO_EXT = {".wav", ".flac", ".ogg", ".mp3"}


def collect(folder: str | Path, what: str) -> dict[str, Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--{what} {folder}: not a folder")
    files = {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.suffix.lower() in AUDIO_EXT}
    if not files:
        raise ValueError(f"--{what} {folder}: no audio files (wav, flac, ogg, mp3) in it")
    return files


def _load(path: Path) -> tuple[np.ndarray, int]:
    from ..engine.audio import read_audio

    audio, sr = read_audio(path)
    return audio.mean(axis=0), sr


def _with_context(stem: np.ndarray, sr: int, ctx_path: Path) -> np.ndarray:
    ctx, csr = _load(ctx_path)
    if csr != sr:
        import soxr
        ctx = soxr.resample(ctx, csr, sr).astype(np.float32)
    n = min(len(stem), len(ctx))
    return stem[:n] + ctx[:n]


def evaluate(generated: str | Path, reference: str | Path, context: str | Path | None = None,
             embedder=None, progress=None) -> dict:
    gen, ref = collect(generated, "generated"), collect(reference, "reference")
    ctx = collect(context, "context") if context is not None else None
    if ctx is not None:
        for what, files in (("generated", gen), ("reference", ref)):
            missing = sorted(set(files) - set(ctx))
            if missing:
                raise ValueError(f"{len(missing)} {what} file(s) have no context file of the same name in "
                                 f"--context (first: {missing[0]}); name each stem like its context")
    if len(gen) < 2 or len(ref) < 2:
        raise ValueError(f"need at least 2 files on each side for a covariance (generated {len(gen)}, "
                         f"reference {len(ref)})")
    embedder = embedder or LogMelEmbedder()
    total, done = len(gen) + len(ref), 0
    side = {}
    for name, files in (("generated", gen), ("reference", ref)):
        embs, descs = [], []
        for rel, path in files.items():
            stem, sr = _load(path)
            embs.append(embedder(stem, sr))
            piece = _with_context(stem, sr, ctx[rel]) if ctx is not None else stem
            try:
                descs.append(dsp.describe(piece, sr))
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
            done += 1
            if progress:
                progress(done, total)
        side[name] = (np.concatenate(embs), descs)
    mean, table = mirdd(side["generated"][1], side["reference"][1])
    return {"fad": fad(side["generated"][0], side["reference"][0]), "fad_embedder": embedder.name,
            "mirdd": mean, "mirdd_table": table, "n_generated": len(gen), "n_reference": len(ref),
            "with_context": ctx is not None}
