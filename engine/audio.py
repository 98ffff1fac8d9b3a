"""Audio I/O: read what libsndfile reads, resample (soxr), match channels, write WAV atomically."""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from .fileutil import default_permissions

SUBTYPES = {"16": "PCM_16", "24": "PCM_24", "float": "FLOAT"}


class AudioError(ValueError):
    """Unusable audio input or output; the message names the file and the fix."""


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """-> (samples [channels, N] float32, sample rate). Rejects missing/unreadable/empty/non-finite audio."""
    import soundfile as sf

    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    if path.is_dir():
        raise AudioError(f"{path}: is a directory, expected an audio file")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile's errors for non-audio / corrupt files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AudioError(f"{path}: not a readable audio file ({msg}); use wav, flac, ogg or mp3") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: the audio is empty (0 samples)")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: the audio contains NaN or infinite samples")
    return np.ascontiguousarray(data.T), int(sr)


def to_format(audio: np.ndarray, sr: int, target_sr: int, channels: int) -> np.ndarray:
    """Resample [C, N] to target_sr and down/up-mix to ``channels`` (mean to mono; mono duplicated)."""
    if audio.shape[0] != channels:
        if channels == 1:
            audio = audio.mean(axis=0, keepdims=True)
        elif audio.shape[0] == 1:
            audio = np.repeat(audio, channels, axis=0)
        else:
            audio = np.repeat(audio.mean(axis=0, keepdims=True), channels, axis=0)
    if sr != target_sr:
        import soxr

        audio = soxr.resample(audio.T, sr, target_sr, quality="HQ").T
    return np.ascontiguousarray(audio, dtype=np.float32)


def peak_safe(audio: np.ndarray, limit: float = 0.999) -> tuple[np.ndarray, float]:
    """Scale down (never up) so that no sample clips; returns (audio, gain applied)."""
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    if peak <= limit:
        return audio, 1.0
    gain = limit / peak
    return audio * gain, gain


def check_output_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise AudioError(f"{path}: output folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise AudioError(f"{path}: is a directory; give a file name ending in .wav")
    return path


def write_wav(path: str | Path, audio: np.ndarray, sr: int, bits: str = "16") -> Path:
    """Write [C, N] as WAV via a temporary file renamed into place (no half-written output)."""
    import soundfile as sf

    path = check_output_path(path)
    if bits not in SUBTYPES:
        raise AudioError(f"unknown bit depth {bits!r}; choose 16, 24 or float")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sf.write(tmp, np.ascontiguousarray(audio.T), sr, subtype=SUBTYPES[bits], format="WAV")
        default_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
