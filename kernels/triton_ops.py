"""Triton kernels for a StemGen step, each with the contract of its PyTorch reference:

  embed_sum          kernels.embedding.embed_sum_ref      fused gather-and-sum of all levels of all
                                                           channels plus every condition, fp32 accumulation
  attention          kernels.attention.attention_ref      flash-style non-causal attention over the packed
                                                           batch (sequences by cumulative lengths), RoPE
                                                           of q and k in one kernel, then online softmax
  rms_norm, add_rms_norm, silu_mul  kernels.norm.*_ref    RMSNorm (with the residual add fused), SwiGLU's
                                                           silu(gate) * up: one read, one write each
  guide_sample_rank  kernels.sampling.guide_sample_rank_ref  guidance + inverse-CDF sampling + rank score,
                                                           the same counter-based noise; one read of
                                                           the logits per frame for V <= 4096

Run on CUDA; on the CPU they run under TRITON_INTERPRET=1 (the tests). Inputs are trusted to be
in range (the scheduler validates requests); ``check=True`` validates on the host first.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention import cu_seqlens as make_cu_seqlens
from .rng import STREAM_RANK, STREAM_SAMPLE, step_key
from .sampling import guide_sample_rank_ref

# ------------------------------------------------------------------------------- embedding-sum


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


@triton.jit
def _rms_norm_kernel(x_ptr, delta_ptr, w_ptr, xo_ptr, out_ptr, D, eps,
                     HAS_DELTA: tl.constexpr, BLOCK_D: tl.constexpr):
    """One row: [x += delta, written back to xo;] out = round(x / rms(x)) * w. fp32 statistics."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    m = offs < D
    x = tl.load(x_ptr + row * D + offs, mask=m, other=0.0)
    if HAS_DELTA:
        d = tl.load(delta_ptr + row * D + offs, mask=m, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(xo_ptr.dtype.element_ty)
        tl.store(xo_ptr + row * D + offs, x, mask=m)
    xf = x.to(tl.float32)
    n = (xf / tl.sqrt(tl.sum(xf * xf, 0) / D + eps)).to(out_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=m, other=0.0)
    tl.store(out_ptr + row * D + offs, (n.to(tl.float32) * w.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=m)


def _norm(x, delta, weight, eps):
    x = x.contiguous()
    N, D = x.shape
    out = torch.empty_like(x)
    xo = torch.empty_like(x) if delta is not None else out
    _rms_norm_kernel[(N,)](x, delta.contiguous() if delta is not None else x, weight, xo, out, D, float(eps),
                           HAS_DELTA=delta is not None, BLOCK_D=triton.next_power_of_2(D),
                           num_warps=8 if D >= 2048 else 4)
    return xo, out


def rms_norm(x, weight, eps):
    """Same contract as kernels.norm.rms_norm_ref (x [N, d]): one read and one write of the rows."""
    return _norm(x, None, weight, eps)[1]


def add_rms_norm(x, delta, weight, eps):
    """Same contract as kernels.norm.add_rms_norm_ref: the residual add fused into the norm."""
    return _norm(x, delta, weight, eps)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, HID, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < HID
    g = tl.load(gu_ptr + row * 2 * HID + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * HID + HID + offs, mask=m, other=0.0).to(tl.float32)
    s = (g * tl.sigmoid(g)).to(out_ptr.dtype.element_ty)   # rounded like F.silu's output
    tl.store(out_ptr + row * HID + offs, (s.to(tl.float32) * u).to(out_ptr.dtype.element_ty), mask=m)


def silu_mul(gate_up):
    """Same contract as kernels.norm.silu_mul_ref ([N, 2h] -> [N, h])."""
    N, two_h = gate_up.shape
    h = two_h // 2
    out = torch.empty(N, h, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(h))
    _silu_mul_kernel[(N, triton.cdiv(h, block))](gate_up.contiguous(), out, h, BLOCK=block)
    return out


# ------------------------------------------------------------------------------- guidance + sampling


@triton.jit
def _fmix32(x):
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x85EBCA6B, tl.uint32)
    x = x ^ (x >> 13)
    x = x * tl.full([], 0xC2B2AE35, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _uniform(key, index):
    """kernels.rng.uniform: key uint32, index uint32 (frame) -> float32 in (0, 1)."""
    h = _fmix32(index * tl.full([], 0x9E3779B1, tl.uint32) + key)
    h = _fmix32(h ^ key)
    return ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)


@triton.jit
def _guided(logits_ptr, w_ptr, m, M, V, offs, vm, R: tl.constexpr, BLOCK_V: tl.constexpr):
    """h = sum_r w_r logits_r at codes ``offs`` of frame m (-inf past V). The guided log-probabilities
    sum_r w_r log_softmax(logits_r) are h minus a constant (sum_r w_r lse_r): every softmax of them,
    so the sampled distribution and the token's probability, is the same from h, with no pass to
    compute each row's log-sum-exp."""
    h = tl.zeros([BLOCK_V], dtype=tl.float32)
    for r in tl.static_range(R):
        h += tl.load(w_ptr + r) * tl.load(logits_ptr + (r * M + m) * V + offs, mask=vm, other=0.0)
    return tl.where(vm, h, float("-inf"))


@triton.jit
def _order_key(x):
    """float32 -> int32 with the same order (flip the magnitude bits of negatives)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _top_k_top_p(z, vm, top_k, top_p, TOP_K: tl.constexpr, TOP_P: tl.constexpr):
    """kernels.sampling.filter_logits on one frame's z (codes in registers) without a sort: exact
    thresholds found by bisection on the order-preserving integer keys (32 halvings each)."""
    key = _order_key(z)
    if TOP_K:   # the k-th largest key: the largest t with #(key >= t) >= k; keeps ties, as the reference
        lo = tl.full([], -2147483648, tl.int64)
        hi = tl.full([], 2147483647, tl.int64)
        for _ in range(32):
            mid = (lo + hi + 1) >> 1
            ok = tl.sum((vm & (key >= mid)).to(tl.int32), 0) >= top_k
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        z = tl.where(key >= lo, z, float("-inf"))
        key = _order_key(z)
    if TOP_P:   # keep a code iff the mass of the codes above it is < top_p: key >= the smallest t
        zmax = tl.max(z, 0)   # with mass(key > t) < top_p
        pr = tl.exp(z - zmax)
        pr = pr / tl.sum(pr, 0)
        lo = tl.full([], -2147483648, tl.int64)
        hi = tl.full([], 2147483647, tl.int64)
        for _ in range(32):
            mid = (lo + hi) >> 1
            ok = tl.sum(tl.where(key > mid, pr, 0.0), 0) < top_p
            hi = tl.where(ok, mid, hi)
            lo = tl.where(ok, lo, mid + 1)
        z = tl.where(key >= lo, z, float("-inf"))
    return z


@triton.jit
def _guide_sample_kernel(logits_ptr, w_ptr, pos_ptr, masked_ptr, tok_ptr, prob_ptr, score_ptr, M, V, length,
                         key_sample, key_rank, inv_temp, w_confidence, w_causal, w_random, top_k, top_p,
                         R: tl.constexpr, GREEDY: tl.constexpr, BLOCK_V: tl.constexpr, ONE_BLOCK: tl.constexpr,
                         TOP_K: tl.constexpr, TOP_P: tl.constexpr):
    m = tl.program_id(0)
    pos = tl.load(pos_ptr + m)
    is_masked = tl.load(masked_ptr + m) != 0
    u = _uniform(key_sample.to(tl.uint32), pos.to(tl.uint32)).to(tl.float64)
    if ONE_BLOCK:
        # the whole vocabulary in registers: ONE read of the frame's logits, everything else on it
        offs = tl.arange(0, BLOCK_V)
        vm = offs < V
        h = _guided(logits_ptr, w_ptr, m, M, V, offs, vm, R, BLOCK_V)
        gmx = tl.max(h, 0)
        glse = gmx + tl.log(tl.sum(tl.exp(h - gmx), 0))
        if GREEDY:
            best = tl.min(tl.where(h == gmx, offs, V), 0)
        else:
            z = h * inv_temp
            if TOP_K or TOP_P:
                z = _top_k_top_p(z, vm, top_k, top_p, TOP_K, TOP_P)
            cs = tl.cumsum(tl.where(vm, tl.exp(z - tl.max(z, 0)), 0.0).to(tl.float64), 0)  # code order
            total = tl.max(cs, 0)  # the last running sum
            best = tl.minimum(tl.min(tl.where((cs > u * total) & vm, offs, V), 0), V - 1)
        g_best = tl.sum(tl.where(offs == best, h, 0.0), 0)
    else:
        # pass 1: max and log-sum-exp of h (online), first argmax
        gmx = tl.full([], float("-inf"), tl.float32)
        gsm = tl.zeros([], dtype=tl.float32)
        best = tl.zeros([], dtype=tl.int32) + V
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            h = _guided(logits_ptr, w_ptr, m, M, V, offs, offs < V, R, BLOCK_V)
            bmax = tl.max(h, 0)
            best = tl.where(bmax > gmx, tl.min(tl.where(h == bmax, offs, V), 0), best)
            new = tl.maximum(gmx, bmax)
            gsm = gsm * tl.exp(gmx - new) + tl.sum(tl.exp(h - new), 0)
            gmx = new
        glse = gmx + tl.log(gsm)
        g_best = gmx
        if not GREEDY:
            # pass 2: total of exp((h - max) / T) in fp64; pass 3: the inverse-CDF scan in code order
            total = tl.zeros([], dtype=tl.float64)
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + tl.arange(0, BLOCK_V)
                vm = offs < V
                h = _guided(logits_ptr, w_ptr, m, M, V, offs, vm, R, BLOCK_V)
                total += tl.sum(tl.where(vm, tl.exp((h - gmx) * inv_temp), 0.0).to(tl.float64), 0)
            acc = tl.zeros([], dtype=tl.float64)
            best = tl.zeros([], dtype=tl.int32) + V
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + tl.arange(0, BLOCK_V)
                vm = offs < V
                h = _guided(logits_ptr, w_ptr, m, M, V, offs, vm, R, BLOCK_V)
                e = tl.where(vm, tl.exp((h - gmx) * inv_temp), 0.0).to(tl.float64)
                idx = tl.min(tl.where(((acc + tl.cumsum(e, 0)) > u * total) & vm, offs, V), 0)
                take = (best == V) & (idx < V)
                g_best = tl.where(take, tl.sum(tl.where(offs == idx, h, 0.0), 0), g_best)
                best = tl.where(take, idx, best)
                acc += tl.sum(e, 0)
            if best == V:  # no running sum exceeded u * total (rounding): the last code, as the reference
                best = V - 1
                offs = (V - 1) + tl.arange(0, BLOCK_V)
                h = _guided(logits_ptr, w_ptr, m, M, V, offs, offs < V, R, BLOCK_V)
                g_best = tl.max(h, 0)
    prob = tl.exp(g_best - glse)
    u_rank = _uniform(key_rank.to(tl.uint32), pos.to(tl.uint32))
    score = w_confidence * prob + w_causal * (1.0 - pos.to(tl.float32) / length) + w_random * u_rank
    tl.store(tok_ptr + m, tl.where(is_masked, best.to(tl.int64), -1))
    tl.store(prob_ptr + m, tl.where(is_masked, prob, 0.0))
    tl.store(score_ptr + m, tl.where(is_masked, score, float("-inf")))


ONE_BLOCK_MAX_V = 4096   # vocabularies up to this are read once per frame (Encodec's 2048 codes are)


def sample_warps(block_v: int, filtering: bool) -> int:
    """Warps per frame of the sampling kernel: 8 codes per thread (16 with top-k/top-p, whose
    bisection loops reduce over the block 64 times), at least 8 warps (4 filtering); no register
    spills at any of these for sm_90 (tests/compile_sm90.py)."""
    return min(16, max(4, block_v // 512)) if filtering else min(16, max(8, block_v // 256))


def guide_sample_rank(logits, weights, positions, masked, length: int, *, seed: int, level: int, step: int,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, w_confidence: float = 0.1,
                      w_causal: float = 0.1, w_random: float = 1.0):
    """Same contract as kernels.sampling.guide_sample_rank_ref. top-k / top-p run in the kernel for
    V <= ONE_BLOCK_MAX_V; beyond, those requests run the reference op (counted in ``fallbacks``)."""
    R, M, V = logits.shape
    use_k, use_p = bool(top_k and top_k < V), 0.0 < top_p < 1.0
    one_block = triton.next_power_of_2(V) <= ONE_BLOCK_MAX_V
    if (use_k or use_p) and not one_block:
        fallbacks["top-k/top-p"] += 1
        return guide_sample_rank_ref(logits, weights, positions, masked, length, seed=seed, level=level, step=step,
                                     temperature=temperature, top_k=top_k, top_p=top_p, w_confidence=w_confidence,
                                     w_causal=w_causal, w_random=w_random)
    dev = logits.device
    tok = torch.empty(M, dtype=torch.int64, device=dev)
    prob = torch.empty(M, dtype=torch.float32, device=dev)
    score = torch.empty(M, dtype=torch.float32, device=dev)
    greedy = temperature <= 0
    block_v = triton.next_power_of_2(V) if one_block else 1024
    _guide_sample_kernel[(M,)](logits.float().contiguous(), weights.float().contiguous(), positions.contiguous(),
                               masked.to(torch.int8).contiguous(), tok, prob, score, M, V, float(length),
                               step_key(seed, level, step, STREAM_SAMPLE), step_key(seed, level, step, STREAM_RANK),
                               0.0 if greedy else 1.0 / temperature, float(w_confidence), float(w_causal), float(w_random),
                               int(top_k), float(top_p), R=R, GREEDY=greedy, BLOCK_V=block_v, ONE_BLOCK=one_block,
                               TOP_K=use_k and not greedy, TOP_P=use_p and not greedy,
                               num_warps=sample_warps(block_v, (use_k or use_p) and not greedy))
    return tok, prob, score


fallbacks = {"top-k/top-p": 0}
