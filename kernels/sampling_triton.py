"""Triton guidance + sampling + rank score: the contract of kernels.sampling.guide_sample_rank_ref,
with the same counter-based noise (kernels.rng). One read of each frame's logits for vocabularies
up to ONE_BLOCK_MAX_V (Encodec's 2048 codes), top-k / top-p included; larger vocabularies take three
blockwise passes (with top-k/top-p: the reference op, counted in ``fallbacks``)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rng import STREAM_RANK, STREAM_SAMPLE, step_key
from .sampling import guide_sample_rank_ref


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
