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

from .registry import Op, Variant, register

BLOCK = 32   # queries per block of the blocked form


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


def _block_mask(T: int, window: int, R: int, device) -> torch.Tensor:
    """bool [R * nb, 1, BLOCK, BLOCK + 2 window]: query i of block b attends key slot j (frame
    b * BLOCK + j - window) where |frame(i) - frame(j)| <= window and the key frame exists."""
    nb, K = -(-T // BLOCK), BLOCK + 2 * window
    i = torch.arange(nb * BLOCK, device=device).view(nb, BLOCK, 1)
    j = (torch.arange(nb, device=device) * BLOCK).view(nb, 1, 1) + torch.arange(K, device=device) - window
    return (((i - j).abs() <= window) & (j >= 0) & (j < T))[:, None].repeat(R, 1, 1, 1)


def band_attention_blocked(q, k, v, segments: list[tuple[int, int]], windows: list[int | None]) -> torch.Tensor:
    """The reference's contract; a band narrower than the request is computed per block of BLOCK
    queries against the only keys its band reaches (BLOCK + 2 window), not as a masked T x T: at
    MAGNeT's band (5) and 500 frames, 42 keys a query instead of 500. Full attention as the reference."""
    N, H, dh = q.shape
    outs, start = [], 0
    for (R, T), window in zip(segments, windows):
        qs, ks, vs = (z[start: start + R * T].view(R, T, H, dh) for z in (q, k, v))
        start += R * T
        if window is None or window >= T - 1 or T <= BLOCK:
            outs.append(band_attention_ref(qs.reshape(R * T, H, dh), ks.reshape(R * T, H, dh), vs.reshape(R * T, H, dh),
                                           [(R, T)], [window]))
            continue
        nb, K = -(-T // BLOCK), BLOCK + 2 * window
        qb = F.pad(qs, (0, 0, 0, 0, 0, nb * BLOCK - T)).view(R, nb, BLOCK, H, dh).permute(0, 1, 3, 2, 4)
        pad = (0, 0, 0, 0, window, nb * BLOCK - T + window)   # key slot j of block b: frame b * BLOCK + j - window
        kb, vb = (F.pad(z, pad).unfold(1, K, BLOCK).permute(0, 1, 2, 4, 3).reshape(R * nb, H, K, dh) for z in (ks, vs))
        o = F.scaled_dot_product_attention(qb.reshape(R * nb, H, BLOCK, dh), kb, vb,
                                           attn_mask=_block_mask(T, window, R, q.device))
        outs.append(o.view(R, nb, H, BLOCK, dh).permute(0, 1, 3, 2, 4).reshape(R, nb * BLOCK, H * dh)[:, :T]
                    .reshape(R * T, H * dh))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _selfcheck(fn, device, dtype) -> str | None:
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2 * 70 + 4, 2, 16, generator=g).to(device, dtype).unbind(0)
    segs, wins = [(2, 70), (1, 4)], [2, None]
    a = fn(q, k, v, segs, wins).float()
    b = band_attention_ref(q.float(), k.float(), v.float(), segs, wins)
    tol = 5 * (1e-4 if dtype == torch.float32 else 3e-2)
    return None if (a - b).abs().max() <= tol * max(1.0, float(b.abs().max())) else \
        "band attention differs from its reference"


OP = register(Op("band_attention", "self-attention (full / banded, no RoPE)", band_attention_ref,
                 selfcheck=_selfcheck,
                 reference_label="torch scaled_dot_product_attention per request, the band as a bool mask"),
              *(Variant(b, ".band_attention:band_attention_blocked", f"torch SDPA per block of {BLOCK} queries and "
                        "the keys their band reaches") for b in ("cpp", "triton")))
