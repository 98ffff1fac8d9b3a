"""Tile sweep of the Triton flash-attention kernel on a GPU, against torch SDPA, at StemGen shapes
(paper model: 16 heads of 64, bf16). GPU time by CUDA events (triton.testing.do_bench), so launch
overhead from Python is out of both sides; each tile is checked against SDPA before it is timed.
    python bench/attn_sweep.py            # prints one line per shape and tile, best tile per shape
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from stemgen.kernels.attention import cu_seqlens
from stemgen.kernels.attention_triton import _flash_kernel, attention_blocks

H, DH = 16, 64
SHAPES = [(3, 1000), (24, 1000), (3, 1500), (24, 1500)]   # (rows, frames): batch 1 and 8 with multi CFG
TILES = [(bm, bn, w, s) for bm, bn, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))]


def flash(q, k, v, cu, n_seqs, T, tile):
    bm, bn, warps, stages = tile
    out = torch.empty_like(q)
    _flash_kernel[(triton.cdiv(T, bm), n_seqs, H)](
        q, k, v, out, cu, *v.stride(), *out.stride(), DH, BLOCK_M=bm, BLOCK_N=bn, DH_P=DH, IEEE=False,
        num_warps=warps, num_stages=stages)
    return out


def main():
    if not torch.cuda.is_available():
        raise SystemExit("attn_sweep.py times GPU kernels: it needs a CUDA device")
    dt = torch.bfloat16
    default = attention_blocks(dt, DH) + (3,)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"current tile (BLOCK_M, BLOCK_N, warps, stages) = {default}")
    for rows, T in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = torch.randn(3, rows * T, H, DH, device="cuda", generator=g, dtype=dt).unbind(0)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        cu = cu_seqlens([(rows, T)], q.device)
        qs, ks, vs = (z.view(rows, T, H, DH).transpose(1, 2) for z in (q, k, v))
        # the kernel takes q pre-scaled by softmax scale * log2(e); SDPA scales itself
        q2 = (q.float() / math.sqrt(DH) * 1.4426950408889634).to(dt)
        ref = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2).reshape(rows * T, H, DH)
        t_sdpa = do_bench(lambda: F.scaled_dot_product_attention(qs, ks, vs))
        flops = 4 * rows * T * T * H * DH
        print(f"rows {rows} T {T}: SDPA {t_sdpa * 1e3:.1f} us ({flops / t_sdpa / 1e9:.0f} TFLOP/s)")
        best = None
        for tile in TILES:
            try:
                out = flash(q2, k, v, cu, rows, T, tile)
                err = (out.float() - ref.float()).abs().max().item()
                if err > 0.05:
                    print(f"  {tile}: WRONG (max err {err:.3g})")
                    continue
                t = do_bench(lambda: flash(q2, k, v, cu, rows, T, tile))
            except Exception as e:  # out of shared memory / registers for this tile
                print(f"  {tile}: failed ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
                continue
            print(f"  {tile}: {t * 1e3:.1f} us, {t_sdpa / t:.2f}x SDPA{'  (current)' if tile == default else ''}")
            if best is None or t < best[1]:
                best = (tile, t)
        if best:
            print(f"best rows {rows} T {T}: {best[0]} {best[1] * 1e3:.1f} us = {t_sdpa / best[1]:.2f}x SDPA")


if __name__ == "__main__":
    main()
