"""MIRDD: per music descriptor, the KL divergence between its distribution over the generated
population and over the reference population (each piece: a stem summed with its context), and
their mean (SPEC section 6). Descriptors come from evaluation.dsp (DSP approximations).

Distributions: scalar descriptors are histogrammed on fixed bins; categorical ones counted; pooled
ones (chords, pitch classes, note pitches) summed over the population. Smoothing: each
distribution is normalised, EPS = 1e-3 is added to every bin and it is normalised again.
KL(reference || generated): how badly the generated population covers what real music does."""
from __future__ import annotations

import numpy as np

from .dsp import PITCH_NAMES

EPS = 1e-3
KEYS = [f"{p} {m}" for m in ("major", "minor") for p in PITCH_NAMES]
CHORDS = [p + q for q in ("", "m") for p in PITCH_NAMES]


def _hist(values, edges):
    return np.histogram(np.clip(values, edges[0], edges[-1] - 1e-9), bins=edges)[0].astype(float)


def _count(values, categories):
    index = {c: i for i, c in enumerate(categories)}
    out = np.zeros(len(categories))
    for v in values:
        out[index[v]] += 1
    return out


DESCRIPTORS = {
    "key": lambda ds: _count([d["key"] for d in ds], KEYS),
    "tempo": lambda ds: _hist([d["tempo"] for d in ds], np.arange(60, 205, 5)),
    "beats_per_bar": lambda ds: _count([d["beats_per_bar"] for d in ds], [3, 4]),
    "n_pitch_classes": lambda ds: _count([d["n_pitch_classes"] for d in ds], list(range(13))),
    "pitch_range": lambda ds: _hist([d["pitch_range"] for d in ds], np.arange(0, 52, 4)),
    "onset_density": lambda ds: _hist([d["onset_density"] for d in ds], np.arange(0, 16.5, 1.0)),
    "percussive_onset_density": lambda ds: _hist([d["percussive_onset_density"] for d in ds], np.arange(0, 16.5, 1.0)),
    "chord_variety": lambda ds: _count([min(d["chord_variety"], 12) for d in ds], list(range(13))),
    "chords": lambda ds: _count([c for d in ds for c in d["chords"]], CHORDS),
    "pitch_classes": lambda ds: np.sum([d["pitch_class_histogram"] for d in ds], axis=0),
    "note_pitches": lambda ds: _hist([p for d in ds for p in d["note_pitches"]] or [0], np.arange(0, 129, 1)),
    "bass_pitch_classes": lambda ds: np.sum([d["bass_pitch_classes"] for d in ds], axis=0),
    "bass_in_key": lambda ds: _hist([d["bass_in_key"] for d in ds], np.linspace(0, 1.0001, 11)),
    "low_offbeat_share": lambda ds: _hist([d["low_offbeat_share"] for d in ds], np.linspace(0, 1.0001, 11)),
}


def smooth(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    p = p / p.sum() if p.sum() > 0 else np.full(len(p), 1.0 / len(p))
    p = p + EPS
    return p / p.sum()


def kl(p: np.ndarray, q: np.ndarray) -> float:
    p, q = smooth(p), smooth(q)
    return float((p * np.log(p / q)).sum())


def mirdd(generated: list[dict], reference: list[dict]) -> tuple[float, dict[str, float]]:
    """-> (mean KL over descriptors, {descriptor: KL(reference || generated)})."""
    if not generated or not reference:
        raise ValueError("MIRDD needs at least one generated and one reference piece")
    table = {name: kl(f(reference), f(generated)) for name, f in DESCRIPTORS.items()}
    return float(np.mean(list(table.values()))), table
