"""Self-attention of the packed batch without rotary positions (MAGNeT adds sinusoidal positions to
the input instead), full or restricted to a band: frame i attends to frame j only where
|i - j| <= window (MAGNeT's ``subcodes_context`` at levels >= 1). The band is a real mask here;
audiocraft's plain-torch attention path silently replaces it with a causal mask (SPEC 9).

q, k, v [N, H, Dh] hold the rows of all requests back to back; ``segments`` lists (rows R, frames T)
per request, ``windows`` each request's band (None: full attention). Returns [N, H * Dh].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Op, register


def band_mask(T: int, window: int, device) -> torch.Tensor:
    """bool [T, T]: True where |i - j| <= window (attend)."""
    i = torch.arange(T, device=device)
    return (i[:, None] - i[None, :]).abs() <= window


def band_attention_ref(q, k, v, segments: list[tuple[int, int]], windows: list[int | None]) -> torch.Tensor:
    N, H, dh = q.shape
    outs, start = [], 0
    for (R, T), window in zip(segments, windows):
        qs, ks, vs = (z[start: start + R * T].view(R, T, H, dh).transpose(1, 2) for z in (q, k, v))
        mask = None if window is None or window >= T - 1 else band_mask(T, window, q.device)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask).transpose(1, 2).reshape(R * T, H * dh))
        start += R * T
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _selfcheck(fn, device, dtype) -> str | None:
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2 * 9 + 4, 2, 16, generator=g).to(device, dtype).unbind(0)
    segs, wins = [(2, 9), (1, 4)], [2, None]
    a = fn(q, k, v, segs, wins).float()
    b = band_attention_ref(q.float(), k.float(), v.float(), segs, wins)
    tol = 5 * (1e-4 if dtype == torch.float32 else 3e-2)
    return None if (a - b).abs().max() <= tol * max(1.0, float(b.abs().max())) else \
        "band attention differs from its reference"


OP = register(Op("band_attention", "self-attention (full / banded, no RoPE)", band_attention_ref,
                 selfcheck=_selfcheck,
                 reference_label="torch scaled_dot_product_attention per request, the band as a bool mask"))
