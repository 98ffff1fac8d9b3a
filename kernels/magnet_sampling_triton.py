"""Triton MAGNeT guidance + sampling: the contract of kernels.magnet_sampling.magnet_sample_ref with the
same counter-based uniform (kernels.rng). One program per frame, the frame's whole vocabulary in
registers (one read of each row's logits) for vocabularies up to ONE_BLOCK_MAX_V (Encodec's 2048
codes); larger vocabularies run the reference op (counted in ``fallbacks``).

No sort: the reference's sorted walks are found by bisection on order-preserving integer keys of
the probabilities (32 halvings, as kernels/sampling_triton.py's top-k / top-p):
  nucleus     keep a code iff the mass before it in descending order is <= top_p;
  sorted draw the first code in descending order whose running sum exceeds u * total: the largest key
              t whose mass at keys >= t exceeds it, then the code at t where the running sum crosses;
  top-k       keep probabilities >= the k-th largest (ties kept), drawn in code order.
Equal probabilities are in code order within the descending order (the reference's stable sort), which
matters for half-precision logits, where ties are common. The nucleus boundary is rounded as the
reference's on the CPU (the group of equal probabilities at the boundary exactly; a mass within an
fp32 rounding of top_p just below it may differ), and the kernel runs without fused multiply-adds,
so the CFG line rounds as the reference's two float ops."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .magnet_sampling import magnet_sample_ref
from .rng import STREAM_SAMPLE, step_key
from .sampling_triton import _order_key, _uniform

ONE_BLOCK_MAX_V = 4096


@triton.jit
def _largest_key(key, w, target, vm):
    """The largest int32 t with sum(w[key >= t]) > target (w >= 0; the sum at t = -2^31 must exceed it)."""
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483647, tl.int64)
    for _ in range(32):
        mid = (lo + hi + 1) >> 1
        ok = tl.sum(tl.where(vm & (key >= mid), w, 0.0), 0) > target
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    return lo


@triton.jit
def _magnet_sample_kernel(logits_ptr, pos_ptr, tok_ptr, prob_ptr, M, V, key, coef, temperature, top_k, top_p,
                          R: tl.constexpr, BLOCK_V: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr):
    m = tl.program_id(0)
    offs = tl.arange(0, BLOCK_V)
    vm = offs < V
    g = tl.load(logits_ptr + m * V + offs, mask=vm, other=0.0)
    if R == 2:   # uncond + (cond - uncond) * coef, the reference's float ops in its order
        un = tl.load(logits_ptr + (M + m) * V + offs, mask=vm, other=0.0)
        g = un + (g - un) * coef
    z = tl.where(vm, tl.math.div_rn(g, temperature), float("-inf"))   # (launched without fp fusion)
    p = tl.exp(z - tl.max(z, 0))
    total_p = tl.sum(p, 0)
    p = p / total_p                       # the untruncated tempered distribution (the confidence's)
    x = _uniform(key.to(tl.uint32), tl.load(pos_ptr + m).to(tl.uint32)).to(tl.float64)
    pk = _order_key(p)
    if TOP_P:
        # the nucleus: a code is kept iff the mass before it in descending order (equal probabilities in
        # code order) is <= top_p, rounded as the reference's (torch's CPU cumsum: an fp64 running sum,
        # each prefix rounded to fp32, minus the code's fp32 probability). lo: the smallest key t with
        # mass(key > t) <= top_p; codes above lo are kept, codes at lo by that rounding
        p64 = tl.where(vm, p, 0.0).to(tl.float64)
        lo = tl.full([], -2147483648, tl.int64)
        hi = tl.full([], 2147483647, tl.int64)
        for _ in range(32):
            mid = (lo + hi) >> 1
            ok = tl.sum(tl.where(pk > mid, p64, 0.0), 0) <= top_p
            hi = tl.where(ok, mid, hi)
            lo = tl.where(ok, lo, mid + 1)
        tie = vm & (pk == lo)
        cum = (tl.sum(tl.where(pk > lo, p64, 0.0), 0) + tl.cumsum(tl.where(tie, p64, 0.0), 0)).to(tl.float32)
        keep = (vm & (pk > lo)) | (tie & (cum - p <= top_p))
        q = tl.where(keep, p, 0.0)
        q = (q / tl.sum(q, 0)).to(tl.float64)
        # the draw in the same order: the key t whose codes' running mass crosses u * total, then the
        # first code at t (in code order) where it does (x < 1: t is a kept key)
        target = x * tl.sum(q, 0)
        t = _largest_key(pk, q, target, vm)
        at_t = vm & (pk == t)
        run = tl.sum(tl.where(vm & (pk > t), q, 0.0), 0) + tl.cumsum(tl.where(at_t, q, 0.0), 0)
        best = tl.minimum(tl.min(tl.where(at_t & (run > target), offs, V), 0), V - 1)
    else:
        w = p
        if TOP_K:   # the k-th largest probability: the largest t with #(key >= t) >= k
            kth = _largest_key(pk, tl.where(vm, 1.0, 0.0), top_k - 0.5, vm)
            w = tl.where(vm & (pk >= kth), p, 0.0)
            w = w / tl.sum(w, 0)
        cs = tl.cumsum(tl.where(vm, w, 0.0).to(tl.float64), 0)   # code order, fp64 as the reference
        total = tl.max(cs, 0)
        best = tl.minimum(tl.min(tl.where((cs > x * total) & vm, offs, V), 0), V - 1)
    bad = total_p != total_p   # a NaN or infinite logit: token 0, prob NaN, as the reference
    tl.store(tok_ptr + m, tl.where(bad, 0, best.to(tl.int64)))
    tl.store(prob_ptr + m, tl.where(bad, float("nan"), tl.sum(tl.where(offs == best, p, 0.0), 0)))


def sample_warps(block_v: int) -> int:
    """Warps per frame: 16 codes a thread (the bisections reduce over the block 64 times), 4 to 16."""
    return min(16, max(4, block_v // 512))


def magnet_sample(logits: torch.Tensor, positions: torch.Tensor, *, seed: int, level: int, step: int,
                  coef: float, temperature: float, top_k: int = 0, top_p: float = 0.9):
    """Same contract as kernels.magnet_sampling.magnet_sample_ref."""
    R, M, V = logits.shape
    if R not in (1, 2):
        raise ValueError("magnet_sample: logits need 1 or 2 rows")
    if not temperature > 0:
        raise ValueError("magnet_sample: temperature must be > 0")
    block_v = triton.next_power_of_2(V)
    if block_v > ONE_BLOCK_MAX_V:
        fallbacks["vocabulary"] += 1
        return magnet_sample_ref(logits, positions, seed=seed, level=level, step=step, coef=coef,
                                 temperature=temperature, top_k=top_k, top_p=top_p)
    tok = torch.empty(M, dtype=torch.int64, device=logits.device)
    prob = torch.empty(M, dtype=torch.float32, device=logits.device)
    if M:
        use_p = top_p > 0.0
        _magnet_sample_kernel[(M,)](logits.float().contiguous(), positions.contiguous(), tok, prob, M, V,
                                    step_key(seed, level, step, STREAM_SAMPLE), float(coef), float(temperature),
                                    int(top_k), float(top_p), R=R, BLOCK_V=block_v, TOP_P=use_p,
                                    TOP_K=not use_p and 0 < top_k < V,
                                    num_warps=sample_warps(block_v), enable_fp_fusion=False)
    return tok, prob


fallbacks = {"vocabulary": 0}
