"""Triton embedding-sum: the contract of kernels.embedding.embed_sum_ref, one program per (frame,
channel) gathering every level's row and every condition's row with fp32 accumulation."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _embed_sum_kernel(tok_ptr, cond_ptr, tab_ptr, ctab_ptr, coff_ptr, out_ptr, T, DC, ROWS_PER_LEVEL,
                      C: tl.constexpr, Q: tl.constexpr, S: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)  # b * T + t
    c = tl.program_id(1)
    b = pid // T
    t = pid % T
    for d0 in range(0, DC, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        dm = offs < DC
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for s in tl.static_range(S):
            row = tl.load(cond_ptr + b * S + s) + tl.load(coff_ptr + s)
            acc += tl.load(ctab_ptr + row * DC + offs, mask=dm, other=0.0).to(tl.float32)
        for q in tl.static_range(Q):
            tid = tl.load(tok_ptr + ((b * C + c) * Q + q) * T + t)
            acc += tl.load(tab_ptr + (q * ROWS_PER_LEVEL + tid) * DC + offs, mask=dm, other=0.0).to(tl.float32)
        tl.store(out_ptr + (pid * C + c) * DC + offs, acc.to(out_ptr.dtype.element_ty), mask=dm)


def embed_blocks(dc: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps) for channel width dc: 8 elements per thread, so 16-byte loads of bf16
    table rows (tests/compile_sm90.py checks)."""
    block = min(triton.next_power_of_2(dc), 1024)
    return block, max(1, block // 256)


def embed_sum(tokens, conditions, tok_table, cond_table, cond_offsets, check: bool = False):
    B, C, Q, T = tokens.shape
    S = conditions.shape[1]
    dc = tok_table.shape[1]
    rows = tok_table.shape[0] // Q
    if check:
        if tokens.min() < 0 or tokens.max() >= rows:
            raise ValueError(f"token ids must be in [0, {rows})")
        if conditions.min() < 0 or (conditions + cond_offsets).max() >= cond_table.shape[0]:
            raise ValueError("condition ids out of range for their tables")
    out = torch.empty(B, T, C * dc, dtype=tok_table.dtype, device=tok_table.device)
    block, warps = embed_blocks(dc)
    _embed_sum_kernel[(B * T, C)](tokens.contiguous(), conditions.contiguous(), tok_table.contiguous(),
                                  cond_table.contiguous(), cond_offsets.contiguous(), out, T, dc, rows,
                                  C=C, Q=Q, S=S, BLOCK_D=block, num_warps=warps)
    return out


# ------------------------------------------------------------------------------- attention
