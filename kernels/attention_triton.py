"""Triton attention of the packed batch: the contract of kernels.attention.attention_ref. One kernel
rotates q and k (RoPE, q pre-scaled by softmax scale x log2 e) into contiguous copies, then a
flash-style kernel (online softmax, exp2) runs each query block of each sequence and head."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention import cu_seqlens as make_cu_seqlens


@triton.jit
def _sequence(cu_ptr, seq):
    """First packed row and length of sequence ``seq``."""
    start = tl.load(cu_ptr + seq)
    return start, tl.load(cu_ptr + seq + 1) - start


@triton.jit
def _rope_qk_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cu_ptr, cos_ptr, sin_ptr, q_scale,
                    sqn, sqh, sqd, skn, skh, skd, HALF, DH,
                    BLOCK: tl.constexpr, HALF_P: tl.constexpr):
    """Rotate-half RoPE of q and k for one block of one sequence's frames and one head, in fp32,
    written contiguous [N, H, Dh]; q is pre-scaled by softmax scale * log2(e) for exp2."""
    pid = tl.program_id(0)
    h = tl.program_id(2)
    H = tl.num_programs(2)
    start, L = _sequence(cu_ptr, tl.program_id(1))
    if pid * BLOCK < L:
        offs = pid * BLOCK + tl.arange(0, BLOCK)          # positions within the sequence
        offs_h = tl.arange(0, HALF_P)
        m2 = (offs < L)[:, None] & (offs_h < HALF)[None, :]
        cs = tl.load(cos_ptr + offs[:, None] * HALF + offs_h[None, :], mask=m2, other=0.0)
        sn = tl.load(sin_ptr + offs[:, None] * HALF + offs_h[None, :], mask=m2, other=0.0)
        rows = start + offs
        out = (rows[:, None] * H + h) * DH + offs_h[None, :]
        pq = q_ptr + rows[:, None] * sqn + h * sqh + offs_h[None, :] * sqd
        x1 = tl.load(pq, mask=m2, other=0.0).to(tl.float32)
        x2 = tl.load(pq + HALF * sqd, mask=m2, other=0.0).to(tl.float32)
        tl.store(qo_ptr + out, ((x1 * cs - x2 * sn) * q_scale).to(qo_ptr.dtype.element_ty), mask=m2)
        tl.store(qo_ptr + out + HALF, ((x2 * cs + x1 * sn) * q_scale).to(qo_ptr.dtype.element_ty), mask=m2)
        pk = k_ptr + rows[:, None] * skn + h * skh + offs_h[None, :] * skd
        x1 = tl.load(pk, mask=m2, other=0.0).to(tl.float32)
        x2 = tl.load(pk + HALF * skd, mask=m2, other=0.0).to(tl.float32)
        tl.store(ko_ptr + out, (x1 * cs - x2 * sn).to(ko_ptr.dtype.element_ty), mask=m2)
        tl.store(ko_ptr + out + HALF, (x2 * cs + x1 * sn).to(ko_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _flash_kernel(q_ptr, k_ptr, v_ptr, out_ptr, cu_ptr, svn, svh, svd, son, soh, sod, DH,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DH_P: tl.constexpr, IEEE: tl.constexpr):
    """Non-causal attention of one query block of one sequence and head, online softmax (exp2).
    q (pre-scaled, rotated) and k (rotated) are contiguous [N, H, Dh]; v and out may be strided."""
    pid_m = tl.program_id(0)
    h = tl.program_id(2)
    H = tl.num_programs(2)
    start, L = _sequence(cu_ptr, tl.program_id(1))
    if pid_m * BLOCK_M < L:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < L
        offs_d = tl.arange(0, DH_P)
        d_mask = offs_d < DH
        q = tl.load(q_ptr + ((start + offs_m)[:, None] * H + h) * DH + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, DH_P], dtype=tl.float32)
        for n0 in range(0, L, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < L
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_ptr + ((start + offs_n)[:, None] * H + h) * DH + offs_d[None, :], mask=kv_mask, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(n_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + (start + offs_n)[:, None] * svn + h * svh + offs_d[None, :] * svd, mask=kv_mask,
                        other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(out_ptr + (start + offs_m)[:, None] * son + h * soh + offs_d[None, :] * sod,
                 out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def attention_blocks(dtype: torch.dtype, dh: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the flash kernel: tiles that compile for sm_90 without
    register spills under Triton 3.6 and 3.8 (tests/compile_sm90.py checks): fp32 (ieee dots, no
    tensor cores) needs smaller tiles; head dims over 64 need 8 warps."""
    if dtype == torch.float32:
        return (32, 16, 8) if dh > 64 else (64, 32, 8)
    return (64, 64, 8) if dh > 64 else (64, 64, 4)


def attention(q, k, v, segments, cos, sin, cu_seqlens=None, block_m: int | None = None,
              block_n: int | None = None):
    """Same contract as kernels.attention.attention_ref; q, k, v [N, H, Dh] may be strided views.
    Two launches: RoPE of q and k once (contiguous copies, q pre-scaled), then flash attention.
    Pass ``cu_seqlens`` (built once per forward) to save building it in every layer."""
    N, H, dh = q.shape
    if dh % 2:
        raise ValueError(f"RoPE needs an even head dim, got {dh}")
    n_seqs = sum(R for R, _ in segments)
    max_len = max(T for _, T in segments)
    cu = cu_seqlens if cu_seqlens is not None else make_cu_seqlens(segments, q.device)
    half = dh // 2
    qr = torch.empty(N, H, dh, dtype=q.dtype, device=q.device)
    kr = torch.empty_like(qr)
    _rope_qk_kernel[(triton.cdiv(max_len, 32), n_seqs, H)](
        q, k, qr, kr, cu, cos.contiguous(), sin.contiguous(), 1.4426950408889634 / math.sqrt(dh),
        *q.stride(), *k.stride(), half, dh, BLOCK=32, HALF_P=triton.next_power_of_2(half))
    out = torch.empty(N, H, dh, dtype=q.dtype, device=q.device)
    bm, bn, warps = attention_blocks(q.dtype, dh)
    bm, bn = block_m or bm, block_n or bn
    _flash_kernel[(triton.cdiv(max_len, bm), n_seqs, H)](
        qr, kr, v, out, cu, *v.stride(), *out.stride(), dh, BLOCK_M=bm, BLOCK_N=bn,
        DH_P=max(16, triton.next_power_of_2(dh)), IEEE=q.dtype == torch.float32, num_warps=warps)
    return out.view(N, H * dh)


# ------------------------------------------------------------------------------- norms, SwiGLU
