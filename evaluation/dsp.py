"""Music descriptors by plain DSP (numpy): onset envelope, tempo, beats per bar, chroma, key,
chords per bar, pitch statistics, onset densities.

These approximate the paper's neural transcription extractors (documented in README): tempo from
the autocorrelation of a spectral-flux onset envelope (searched in 80-160 BPM, the pop tempo
octave: pieces outside it get octave errors), meter from the low-band accent period, key by
Krumhansl-Kessler profile correlation of the mean chroma, chords by triad templates on bar-mean
chroma, pitches from the strongest spectral peak per frame.
"""
from __future__ import annotations

import numpy as np

SR = 22050
N_FFT = 2048
HOP = 256
PITCH_NAMES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
KK_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
KK_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


def prepare(audio: np.ndarray, sr: int) -> np.ndarray:
    """Mono float64 at SR."""
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim == 2:
        x = x.mean(axis=0 if x.shape[0] <= 8 else 1)
    if sr != SR:
        import soxr
        x = soxr.resample(x, sr, SR)
    return x.astype(np.float64)


def stft_mag(x: np.ndarray) -> np.ndarray:
    """|STFT| [frames, bins], Hann window, centred frames."""
    x = np.pad(x, N_FFT // 2)
    n = 1 + max(0, (len(x) - N_FFT) // HOP)
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(n)[:, None]
    return np.abs(np.fft.rfft(x[idx] * np.hanning(N_FFT), axis=1))


def onset_envelope(mag: np.ndarray, lo_hz: float = 0, hi_hz: float = SR / 2) -> np.ndarray:
    f = np.fft.rfftfreq(N_FFT, 1 / SR)
    band = (f >= lo_hz) & (f < hi_hz)
    lm = np.log1p(100 * mag[:, band])
    flux = np.maximum(0, np.diff(lm, axis=0)).sum(axis=1)
    flux = np.concatenate([[0], flux])
    flux -= np.convolve(flux, np.ones(16) / 16, mode="same")  # remove the slow trend
    return np.maximum(flux, 0)


def _acf(env: np.ndarray) -> np.ndarray:
    e = env - env.mean()
    n = len(e)
    spec = np.fft.rfft(e, 2 * n)
    ac = np.fft.irfft(np.abs(spec) ** 2)[:n]
    return ac / (ac[0] + 1e-12) / (1 - np.arange(n) / n + 1e-9)  # unbiased


def _peak(ac: np.ndarray, lag: float, width: float) -> float:
    """Sub-frame position of the ACF maximum within lag +- width (parabolic interpolation)."""
    lo, hi = max(1, int(lag - width)), min(len(ac) - 2, int(np.ceil(lag + width)))
    if hi <= lo:
        return lag
    i = lo + int(np.argmax(ac[lo:hi + 1]))
    a, b, c = ac[i - 1], ac[i], ac[i + 1]
    den = a - 2 * b + c
    return i + (0.5 * (a - c) / den if den < 0 else 0.0)


def tempo(env: np.ndarray, lo_bpm: float = 80, hi_bpm: float = 160) -> float:
    fps = SR / HOP
    ac = _acf(env)
    lags = np.arange(int(fps * 60 / hi_bpm), int(fps * 60 / lo_bpm) + 1)
    lags = lags[lags < len(ac) // 2]
    if len(lags) == 0:
        return float("nan")
    # a beat period has strong half (eighths) and double (half notes) lags too; a 1.5-beat lag does not
    half = np.interp(lags / 2, np.arange(len(ac)), ac)
    double = np.interp(np.minimum(2 * lags, len(ac) - 1), np.arange(len(ac)), ac)
    period = _peak(ac, lags[np.argmax(ac[lags] + 0.5 * half + 0.5 * double)], 1.5)
    for k in (2, 4, 8):  # refine on the peaks k beats away
        if k * period * 1.1 < len(ac) * 0.6:
            period = _peak(ac, k * period, 2.5) / k
    return 60 * fps / period


def beats_per_bar(env_low: np.ndarray, bpm: float) -> int:
    """3 or 4: which bar length the low band (kick) repeats at more strongly."""
    fps = SR / HOP
    ac = _acf(env_low)
    beat = 60 * fps / bpm
    score = {m: max(ac[int(round(m * beat)) + d] for d in (-1, 0, 1)) if m * beat + 2 < len(ac) else -1 for m in (3, 4)}
    return max(score, key=score.get)


def chroma(mag: np.ndarray, fmin: float = 250.0, fmax: float = 2500.0) -> np.ndarray:
    """[frames, 12] pitch-class salience: magnitudes of spectral peaks (local maxima) between fmin
    and fmax, each added to its nearest pitch class. Below about B3 the 10.8 Hz FFT bins are too
    coarse for semitones (and kick drums live there), so that range is left out; bass lines still
    count through their harmonics."""
    f = np.fft.rfftfreq(N_FFT, 1 / SR)
    sel = np.where((f >= fmin) & (f <= fmax))[0]
    pc = np.round(12 * np.log2(f[sel] / 440.0) + 69).astype(int) % 12
    m = np.zeros((len(sel), 12))
    m[np.arange(len(sel)), pc] = 1
    a = mag[:, sel]
    is_peak = (a >= mag[:, sel - 1]) & (a >= mag[:, sel + 1])
    return (a * is_peak) @ m


def diatonic_triads(tonic: int, mode: str) -> set[tuple[int, str]]:
    """Major and minor triads built on the key's scale degrees (minor keys: also the major V)."""
    scale = [0, 2, 4, 5, 7, 9, 11] if mode == "major" else [0, 2, 3, 5, 7, 8, 10]
    out = set()
    for d in range(7):
        third, fifth = (scale[(d + 2) % 7] - scale[d]) % 12, (scale[(d + 4) % 7] - scale[d]) % 12
        if fifth == 7:
            out.add(((tonic + scale[d]) % 12, "maj" if third == 4 else "min"))
    if mode == "minor":
        out.add(((tonic + 7) % 12, "maj"))
    return out


def key(chroma_frames: np.ndarray, bar_chords: list[tuple[int, str]] | None = None) -> tuple[int, str]:
    """Krumhansl-Kessler profile correlation of the mean chroma, plus chord evidence when the bar
    chords are known: the share of bars whose chord is diatonic to the key, and the share on the
    key's tonic triad with the first bar counting double (music mostly opens on its tonic).
    Profiles alone confuse keys a fifth apart and relative major/minor."""
    c = chroma_frames.sum(axis=0)
    c = c / (c.sum() + 1e-12)
    best, arg = -np.inf, (0, "major")
    for tonic in range(12):
        for mode, prof in (("major", KK_MAJOR), ("minor", KK_MINOR)):
            score = np.corrcoef(c, np.roll(prof, tonic))[0, 1]
            if bar_chords:
                triad = (tonic, "maj" if mode == "major" else "min")
                hits = [ch == triad for ch in bar_chords]
                diatonic = diatonic_triads(tonic, mode)
                score += 0.5 * (sum(hits) + hits[0]) / (len(hits) + 1)
                score += 1.0 * np.mean([ch in diatonic for ch in bar_chords])
            if score > best:
                best, arg = score, (tonic, mode)
    return arg


def chord_templates() -> tuple[np.ndarray, list[tuple[int, str]]]:
    tpl, names = [], []
    for root in range(12):
        for q, third in (("maj", 4), ("min", 3)):
            t = np.zeros(12)
            t[[root, (root + third) % 12, (root + 7) % 12]] = 1
            tpl.append(t / np.linalg.norm(t))
            names.append((root, q))
    return np.array(tpl), names


def chords(chroma_frames: np.ndarray, bar_frames: float, offset: float = 0.0) -> list[tuple[int, str]]:
    """Best triad per bar of ``bar_frames`` frames starting at frame ``offset``."""
    tpl, names = chord_templates()
    out = []
    n_bars = int((len(chroma_frames) - offset) // bar_frames)
    for b in range(n_bars):
        seg = chroma_frames[int(offset + b * bar_frames): int(offset + (b + 1) * bar_frames)].sum(axis=0)
        seg = np.sqrt(seg)  # compress the loudest partials
        out.append(names[int(np.argmax(tpl @ (seg / (np.linalg.norm(seg) + 1e-12))))])
    return out


def dominant_pitches(mag: np.ndarray, fmin: float = 30.0, fmax: float = 2000.0, rel_db: float = -30) -> np.ndarray:
    """MIDI pitch of the strongest spectral peak of each frame loud enough (within rel_db of the loudest)."""
    f = np.fft.rfftfreq(N_FFT, 1 / SR)
    sel = np.where((f >= fmin) & (f <= fmax))[0]
    energy = (mag ** 2).sum(axis=1)
    loud = energy > energy.max() * 10 ** (rel_db / 10) if energy.max() > 0 else np.zeros(len(energy), bool)
    peak = sel[np.argmax(mag[:, sel], axis=1)]
    return np.round(12 * np.log2(f[peak[loud]] / 440.0) + 69).astype(int)


def onset_times(env: np.ndarray, rel: float = 0.3) -> np.ndarray:
    """Peaks of the onset envelope above rel * max, at least 50 ms apart (seconds)."""
    fps = SR / HOP
    if env.max() <= 0:
        return np.zeros(0)
    thr = rel * env.max()
    gap = int(0.05 * fps)
    peaks, last = [], -gap
    for i in range(1, len(env) - 1):
        if env[i] >= thr and env[i] >= env[i - 1] and env[i] > env[i + 1] and i - last >= gap:
            peaks.append(i)
            last = i
    return np.array(peaks) / fps


def bass_chroma(x: np.ndarray, fmin: float = 40.0, fmax: float = 260.0, n_fft: int = 8192) -> np.ndarray:
    """Pitch-class salience of the bass register [12]: a long FFT (2.7 Hz bins) resolves semitones there."""
    hop = n_fft // 4
    if len(x) < n_fft:
        x = np.pad(x, (0, n_fft - len(x)))
    idx = np.arange(n_fft)[None, :] + hop * np.arange(1 + (len(x) - n_fft) // hop)[:, None]
    mag = np.abs(np.fft.rfft(x[idx] * np.hanning(n_fft), axis=1))
    f = np.fft.rfftfreq(n_fft, 1 / SR)
    sel = np.where((f >= fmin) & (f <= fmax))[0]
    a = mag[:, sel]
    a = a * ((a >= mag[:, sel - 1]) & (a >= mag[:, sel + 1]))
    pc = np.round(12 * np.log2(f[sel] / 440.0) + 69).astype(int) % 12
    out = np.zeros(12)
    np.add.at(out, pc, a.sum(axis=0))
    return out / (out.sum() + 1e-12)


def offbeat_share(env: np.ndarray, bpm: float) -> float:
    """Share of onset-envelope energy half a beat away from the beat grid (grid phase: where the
    folded envelope peaks)."""
    if not np.isfinite(bpm) or env.sum() <= 0:
        return 0.0
    period = 60 * SR / HOP / bpm
    phase = (np.arange(len(env)) % period) / period
    bins = np.bincount(np.minimum((phase * 20).astype(int), 19), weights=env, minlength=20)
    on = int(np.argmax(bins))
    dist = np.abs(((np.arange(20) - on + 10) % 20) - 10)   # 0 on the beat .. 10 half a beat away
    return float(bins[dist >= 7].sum() / bins.sum())


def describe(audio: np.ndarray, sr: int, bar_seconds: float | None = None) -> dict:
    """All descriptors of one (mixed) piece. ``bar_seconds`` (if known) sets the chord grid.
    Beyond the paper's list (approximated), two DSP descriptors make the bass line visible in a
    mix: how much of the bass register's pitch content is in the estimated key, and how much of
    the low-band onset energy falls off the beat."""
    x = prepare(audio, sr)
    if len(x) < N_FFT:
        raise ValueError("audio too short for analysis (needs about 0.1 s)")
    mag = stft_mag(x)
    env = onset_envelope(mag)
    bpm = tempo(env)
    bpb = beats_per_bar(onset_envelope(mag, 0, 200), bpm) if np.isfinite(bpm) else 4
    ch = chroma(mag)
    fps = SR / HOP
    bar_frames = (bar_seconds if bar_seconds else bpb * 60 / bpm) * fps
    chs = chords(ch, bar_frames)
    tonic, mode = key(ch, chs)
    pitches = dominant_pitches(mag)
    duration = len(x) / SR
    pc_energy = ch.sum(axis=0) / (ch.sum() + 1e-12)
    return {
        "tempo": bpm, "beats_per_bar": bpb, "key": f"{PITCH_NAMES[tonic]} {mode}", "tonic": tonic, "mode": mode,
        "chords": [PITCH_NAMES[r] + ("m" if q == "min" else "") for r, q in chs],
        "chord_variety": len(set(chs)),
        "pitch_class_histogram": pc_energy.tolist(),
        "n_pitch_classes": int((pc_energy > 0.05).sum()),
        "pitch_range": int(np.percentile(pitches, 95) - np.percentile(pitches, 5)) if len(pitches) else 0,
        "note_pitches": pitches.tolist(),
        "onset_density": len(onset_times(env)) / duration,
        "bass_pitch_classes": (bc := bass_chroma(x)).tolist(),
        "bass_in_key": float(sum(bc[(tonic + d) % 12] for d in ([0, 2, 4, 5, 7, 9, 11] if mode == "major"
                                                               else [0, 2, 3, 5, 7, 8, 10]))),
        "low_offbeat_share": offbeat_share(onset_envelope(mag, 0, 250), bpm),
        "percussive_onset_density": len(onset_times(onset_envelope(mag, 5000))) / duration,
    }
