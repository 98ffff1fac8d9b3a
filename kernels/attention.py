"""Attention of the packed batch: RoPE on q and k, then non-causal softmax attention within each
sequence (a request's guidance row); sequences never attend to each other.

q, k, v [N, H, Dh] hold the rows of all requests back to back; ``segments`` lists (rows R, frames T)
per request in order, so the sequences are R rows of T frames each. cos, sin [T_max, Dh/2] fp32.
Returns [N, H * Dh] in the input dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Op, Variant, register


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on [N, H, Dh] with cos/sin [N, Dh/2] (fp32 maths)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def cu_seqlens(segments: list[tuple[int, int]], device) -> torch.Tensor:
    """int32 [sequences + 1]: where each sequence (a request's row) starts in the packed batch, and
    the end. Made on the device from Python ints: no host-to-device copy (so no host sync, and it
    can be recorded in a CUDA graph)."""
    parts, start = [torch.zeros(1, dtype=torch.int32, device=device)], 0
    for R, T in segments:
        parts.append(torch.arange(1, R + 1, dtype=torch.int32, device=device) * T + start)
        start += R * T
    return torch.cat(parts)


def positions_of(segments: list[tuple[int, int]], device) -> torch.Tensor:
    return torch.cat([torch.arange(T, device=device).repeat(R) for R, T in segments])


def attention_ref(q, k, v, segments: list[tuple[int, int]], cos: torch.Tensor, sin: torch.Tensor,
                  cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """``cu_seqlens`` (see cu_seqlens()) is accepted for the kernels' contract and not needed here."""
    N, H, dh = q.shape
    if len(segments) == 1:
        R, T = segments[0]
        pc, ps = cos[:T].repeat(R, 1), sin[:T].repeat(R, 1)
    else:
        pos = positions_of(segments, q.device)
        pc, ps = cos[pos], sin[pos]
    q, k = rope_ref(q, pc, ps), rope_ref(k, pc, ps)
    outs, start = [], 0
    for R, T in segments:
        qs, ks, vs = (z[start: start + R * T].view(R, T, H, dh).transpose(1, 2) for z in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2).reshape(R * T, H * dh))
        start += R * T
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _selfcheck(fn, device, dtype) -> str | None:
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2 * 7 + 3, 2, 32, generator=g).to(device, dtype).unbind(0)
    ang = torch.outer(torch.arange(7.0), torch.rand(16, generator=g)).to(device)
    segs = [(2, 7), (1, 3)]
    a = fn(q, k, v, segs, ang.cos(), ang.sin()).float()
    b = attention_ref(q.float(), k.float(), v.float(), segs, ang.cos(), ang.sin()).float()
    tol = 5 * (1e-4 if dtype == torch.float32 else 3e-2)
    return None if (a - b).abs().max() <= tol * max(1.0, float(b.abs().max())) else \
        "attention differs from its reference"


OP = register(
    Op("attention", "attention", attention_ref, selfcheck=_selfcheck,
       reference_label="RoPE + torch scaled_dot_product_attention per request (PyTorch reference)"),
    Variant("triton", ".attention_triton:attention", "Triton (RoPE kernel + flash-style kernel, packed)"),
    Variant("cpp", "..cpp_ext:attention", "C++ RoPE + [R, H, T, dh] layout in one pass, then torch "
            "scaled_dot_product_attention per request", dtypes=(torch.float32, torch.bfloat16)))
