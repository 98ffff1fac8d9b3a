"""Audio I/O: read what libsndfile reads, resample (soxr), match channels, write WAV atomically."""
from __future__ import annotations

import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from .fileutil import default_permissions, temp_prefix

SUBTYPES = {"16": "PCM_16", "24": "PCM_24", "float": "FLOAT"}
# output container per file extension (libsndfile format name); subtypes per container below
AUDIO_EXTS = {".wav", ".flac", ".ogg", ".mp3", ".aif", ".aiff"}   # inputs a folder run picks up
CONTAINERS = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".mp3": "MP3"}
# input limits, checked from the file header before any sample is read (README "Limits")
MIN_SAMPLE_RATE = 4000
MAX_SAMPLE_RATE = 384000
MAX_CHANNELS = 32
# decoded samples x channels one input may allocate (float32: 4 bytes each, so 512 MiB), checked
# from the header before decoding, and again for the resampled length before resampling: a small
# compressed file (8 channels of 96 kHz silence for 10 minutes is 0.5 MB of FLAC) would
# otherwise decode to gigabytes
MAX_SAMPLES = 1 << 27


def _env_number(name: str, default: float, lo: float, hi: float, integer: bool = False) -> float:
    """A number from the environment variable ``name`` (``default`` when unset), finite, in [lo, hi]."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not lo <= value <= hi or (integer and not value.is_integer()):
        what = "a whole number" if integer else "a number"
        raise AudioError(f"{name}={text[:40]!r}: must be {what} from {lo:g} to {hi:g}")
    return int(value) if integer else value


def max_seconds() -> float:
    """Longest accepted input (seconds): STEMGEN_MAX_SECONDS, default 1200 (20 minutes)."""
    return _env_number("STEMGEN_MAX_SECONDS", 1200.0, 0.001, 1e7)


def max_samples() -> int:
    """Most decoded samples x channels an input may take (before and after resampling):
    STEMGEN_MAX_SAMPLES, default 2^27 (134,217,728: 512 MiB of float32)."""
    return _env_number("STEMGEN_MAX_SAMPLES", MAX_SAMPLES, 1, 1 << 40, integer=True)


def check_budget(frames: int, channels: int, sample_rate: int, target_rate: int | None = None,
                 target_channels: int | None = None, name: str = "the audio", budget: int | None = None) -> None:
    """Refuse, from header values alone, audio whose decoding (frames x channels) or whose
    resampling to ``target_rate`` with ``target_channels`` would exceed the samples budget
    (``budget``, default ``max_samples()``)."""
    budget = max_samples() if budget is None else budget
    if not (isinstance(sample_rate, (int, float, np.integer, np.floating)) and math.isfinite(sample_rate)
            and sample_rate > 0):
        raise AudioError(f"{name}: sample rate {sample_rate!r} is not a positive number of Hz")
    if frames * channels > budget:
        raise AudioError(f"{name}: {frames} frames x {channels} channels would decode to {frames * channels:,} "
                         f"samples, more than the {budget:,} limit (STEMGEN_MAX_SAMPLES); trim, downmix or "
                         "resample it first")
    if target_rate is not None and target_channels is not None:
        n = math.ceil(frames * target_rate / sample_rate) * target_channels
        if n > budget:
            raise AudioError(f"{name}: resampled to {target_rate} Hz x {target_channels} channel(s) it would "
                             f"take {n:,} samples, more than the {budget:,} limit (STEMGEN_MAX_SAMPLES)")


from .errors import AudioError  # noqa: E402,F401  (re-exported)


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """-> (samples [channels, N] float32, sample rate). Rejects missing/unreadable/empty/non-finite audio."""
    import soundfile as sf

    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    if path.is_dir():
        raise AudioError(f"{path}: is a directory, expected an audio file")
    try:
        info = sf.info(str(path))
    except Exception as e:  # libsndfile's errors for non-audio / corrupt files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AudioError(f"{path}: not a readable audio file ({msg}); use wav, flac, ogg or mp3") from None
    if not MIN_SAMPLE_RATE <= info.samplerate <= MAX_SAMPLE_RATE:
        raise AudioError(f"{path}: sample rate {info.samplerate} Hz is outside the supported "
                         f"{MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz; resample the file first")
    if not 1 <= info.channels <= MAX_CHANNELS:
        raise AudioError(f"{path}: {info.channels} channels; at most {MAX_CHANNELS} are supported")
    limit = max_seconds()
    if info.frames > limit * info.samplerate:
        raise AudioError(f"{path}: {info.frames / info.samplerate:.1f} s is longer than the {limit:g} s limit; "
                         "trim it, or raise STEMGEN_MAX_SECONDS")
    check_budget(info.frames, info.channels, info.samplerate, name=str(path))
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


def check_output_path(path: str | Path, bits: str = "16") -> Path:
    """An output path whose folder exists and is writable and whose extension names a container
    libsndfile can write with ``bits``; checked before any work is done."""
    import soundfile as sf

    path = Path(path)
    if not path.parent.is_dir():
        raise AudioError(f"{path}: output folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise AudioError(f"{path}: is a directory; give a file name ending in .wav")
    ext = path.suffix.lower()
    if ext not in CONTAINERS or CONTAINERS[ext] not in sf.available_formats():
        ok = ", ".join(e for e, f in CONTAINERS.items() if f in sf.available_formats())
        raise AudioError(f"{path}: cannot write {ext or 'files without an extension'}; use one of {ok}")
    if _subtype(ext, bits) is None:
        raise AudioError(f"{path}: {ext} cannot hold --bits {bits}; use .wav for that, or other --bits")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise AudioError(f"{path}: output folder {path.parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise AudioError(f"{path}: exists and is not writable")
    return path


def _subtype(ext: str, bits: str) -> str | None:
    if ext == ".wav":
        return SUBTYPES.get(bits)
    if ext == ".flac":
        return {"16": "PCM_16", "24": "PCM_24"}.get(bits)
    if ext == ".ogg":
        return "VORBIS"
    if ext == ".mp3":
        return "MPEG_LAYER_III"
    return None


def check_distinct(inputs: list[Path], outputs: list[Path], made_from: list[Path] | None = None) -> None:
    """Refuse an output that is an input (it would be overwritten) or is named twice; ``made_from``
    (the input of each output, for folder runs) names the two inputs that would share an output."""
    seen = {}
    for p in inputs:
        seen[os.path.realpath(p)] = ("input", p, None)
    for i, p in enumerate(outputs):
        key = os.path.realpath(p)
        src = made_from[i] if made_from else None
        if key in seen:
            kind, other, other_src = seen[key]
            if kind == "output" and src is not None and other_src is not None:
                raise AudioError(f"{p}: would be the output of both {other_src} and {src}; rename one of them")
            what = "the input" if kind == "input" else "another output"
            raise AudioError(f"{p}: is also {what} ({other}); choose a different output name")
        seen[key] = ("output", p, src)


def write_audio_set(items: list[tuple[Path, np.ndarray, int]], bits: str = "16") -> list[Path]:
    """Write every (path, audio [C, N], sr) all-or-nothing: each goes to a temporary sibling first;
    only when all are written are they renamed into place. An OS error is one AudioError line."""
    import soundfile as sf

    tmps = []
    try:
        for path, audio, sr in items:
            path = check_output_path(path, bits)
            ext = path.suffix.lower()
            fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmps.append((tmp, path))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sf.write(tmp, np.ascontiguousarray(audio.T), sr, subtype=_subtype(ext, bits), format=CONTAINERS[ext])
            default_permissions(tmp)
        for tmp, path in tmps:
            os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # RuntimeError: libsndfile's own error type
        msg = getattr(e, "strerror", None) or str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AudioError(f"cannot write {tmps[-1][1] if tmps else items[0][0]}: {msg}") from None
    finally:
        for tmp, _ in tmps:
            Path(tmp).unlink(missing_ok=True)
    return [p for _, p in tmps]


def write_wav(path: str | Path, audio: np.ndarray, sr: int, bits: str = "16") -> Path:
    """Write [C, N] in the format the extension names (.wav by default), atomically."""
    return write_audio_set([(Path(path), audio, sr)], bits)[0]


def splice(generated: np.ndarray, take: np.ndarray, keep: np.ndarray, fade: int) -> np.ndarray:
    """Audio [C, N]: ``take`` where ``keep`` (bool [N]) is true, ``generated`` elsewhere, with
    linear crossfades of ``fade`` samples centred on every seam."""
    n = generated.shape[-1]
    t = np.zeros(n, dtype=np.float32)
    k = keep[:n].astype(np.float32)
    m = min(take.shape[-1], n)
    t[:m] = 1.0
    w = k * t                                    # weight of the take: 1 kept, 0 generated
    if fade > 1:
        w = np.convolve(np.pad(w, (fade // 2, fade - 1 - fade // 2), mode="edge"), np.ones(fade) / fade, "valid")
    out = generated * (1 - w)
    out[..., :m] += take[..., :m] * w[:m]
    return out.astype(np.float32)
