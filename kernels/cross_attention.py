"""Cross-attention of the packed batch's conditioned rows to each request's own text memory (MAGNeT:
queries from the frames, keys and values from the T5 memory, projected once per request).

q [Nq, H, Dh]: the conditioned rows of all requests back to back, ``segments`` (rows R, frames T)
per request; k, v [sum L, H, Dh]: each request's memory keys and values back to back, ``lengths``
L per request. No key-padding mask is needed: each request attends to exactly its own L keys, so a
request's output does not depend on the other prompts in the batch (in audiocraft it does: prompts
are padded to the longest and the padded keys still take softmax mass). Returns [Nq, H * Dh].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Op, register


def cross_attention_ref(q, k, v, segments: list[tuple[int, int]], lengths: list[int]) -> torch.Tensor:
    _, H, dh = q.shape
    outs, qs, ks = [], 0, 0
    for (R, T), L in zip(segments, lengths):
        qr = q[qs: qs + R * T].view(1, R * T, H, dh).transpose(1, 2)
        kr, vr = (z[ks: ks + L].view(1, L, H, dh).transpose(1, 2) for z in (k, v))
        outs.append(F.scaled_dot_product_attention(qr, kr, vr).transpose(1, 2).reshape(R * T, H * dh))
        qs, ks = qs + R * T, ks + L
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _selfcheck(fn, device, dtype) -> str | None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2 * 5 + 3, 2, 16, generator=g).to(device, dtype)
    k, v = torch.randn(2, 4 + 7, 2, 16, generator=g).to(device, dtype).unbind(0)
    segs, lens = [(2, 5), (1, 3)], [4, 7]
    a = fn(q, k, v, segs, lens).float()
    b = cross_attention_ref(q.float(), k.float(), v.float(), segs, lens)
    tol = 5 * (1e-4 if dtype == torch.float32 else 3e-2)
    return None if (a - b).abs().max() <= tol * max(1.0, float(b.abs().max())) else \
        "cross-attention differs from its reference"


OP = register(Op("cross_attention", "cross-attention (text memory)", cross_attention_ref, selfcheck=_selfcheck,
                 reference_label="torch scaled_dot_product_attention per request (its own memory length)"))
