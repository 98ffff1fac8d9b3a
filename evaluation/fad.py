"""Frechet Audio Distance: the Frechet distance between Gaussian fits of two embedding populations,
with pluggable embedding extractors (``LogMelEmbedder`` here, weight-free; ``VGGishEmbedder`` in
evaluation.vggish with weights converted from the usual VGGish checkpoint)."""
from __future__ import annotations

import numpy as np


def gaussian(emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of embeddings [N, D]; N = 1 gives a zero covariance."""
    emb = np.asarray(emb, dtype=np.float64)
    if emb.ndim != 2 or len(emb) == 0:
        raise ValueError(f"embeddings must be a non-empty [N, D] array, got shape {emb.shape}")
    mu = emb.mean(axis=0)
    cov = np.cov(emb, rowvar=False) if len(emb) > 1 else np.zeros((emb.shape[1], emb.shape[1]))
    return mu, np.atleast_2d(cov)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    a = (a + a.T) / 2
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + tr(C1) + tr(C2) - 2 tr((C1 C2)^(1/2)).

    tr((C1 C2)^(1/2)) is computed as tr((S C2 S)^(1/2)) with S = C1^(1/2): both factors are
    symmetric positive semi-definite, so eigh applies and negative round-off eigenvalues are
    clipped to zero; this stays finite for rank-deficient covariances (fewer samples than dims)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shape mismatch: means {mu1.shape} / {mu2.shape}, covariances {cov1.shape} / {cov2.shape}")
    s1 = _psd_sqrt(cov1)
    m = s1 @ cov2 @ s1
    w = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = np.sqrt(np.clip(w, 0, None)).sum()
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt)
    return max(d, 0.0)


def fad(emb_a: np.ndarray, emb_b: np.ndarray) -> float:
    return frechet_distance(*gaussian(emb_a), *gaussian(emb_b))


def mel_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """VGGish's mel matrix [n_fft//2+1, n_mels]: triangles in the HTK-mel domain between equally
    spaced mel edges, the DC bin left out."""
    mel = lambda f: 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)  # noqa: E731
    edges = np.linspace(mel(fmin), mel(fmax), n_mels + 2)
    bins = mel(np.linspace(0.0, sr / 2, n_fft // 2 + 1))
    fb = np.zeros((len(bins), n_mels))
    for i in range(n_mels):
        lo, c, hi = edges[i], edges[i + 1], edges[i + 2]
        fb[:, i] = np.maximum(0.0, np.minimum((bins - lo) / (c - lo), (hi - bins) / (hi - c)))
    fb[0, :] = 0.0
    return fb


def log_mel(x: np.ndarray, sr: int = 16000, n_fft: int = 512, win: int = 400, hop: int = 160,
            n_mels: int = 64, fmin: float = 125.0, fmax: float = 7500.0) -> np.ndarray:
    """VGGish-style log-mel frames [frames, n_mels]: 25 ms periodic-Hann windows, 10 ms hop, log(mel + 0.01)."""
    if len(x) < win:
        x = np.pad(x, (0, win - len(x)))
    n = 1 + (len(x) - win) // hop
    idx = np.arange(win)[None, :] + hop * np.arange(n)[:, None]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
    mag = np.abs(np.fft.rfft(x[idx] * window, n_fft, axis=1))
    return np.log(mag @ mel_filterbank(sr, n_fft, n_mels, fmin, fmax) + 0.01)


def to_16k_mono(audio: np.ndarray, sr: int) -> np.ndarray:
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim == 2:
        x = x.mean(axis=0 if x.shape[0] <= 8 else 1)
    if sr != 16000:
        import soxr
        x = soxr.resample(x, sr, 16000)
    return x.astype(np.float64)


class LogMelEmbedder:
    """Weight-free embeddings: per 0.96 s window (hop 0.48 s), the mean and standard deviation of
    64 log-mel bands (128 dims). Useful to compare checkpoints and settings with each other; NOT
    comparable to published FAD numbers, which use VGGish embeddings."""
    name = "logmel-stats"

    def __call__(self, audio: np.ndarray, sr: int) -> np.ndarray:
        lm = log_mel(to_16k_mono(audio, sr))
        starts = range(0, max(1, len(lm) - 96 + 1), 48)
        return np.stack([np.concatenate([lm[s:s + 96].mean(0), lm[s:s + 96].std(0)]) for s in starts])
