"""The Triton attention op's configurations on a GPU against torch SDPA, at StemGen shapes (paper
model: 16 heads of 64, bf16): where RoPE happens (its own kernel, in the flash kernel for q, or for
q and k), unmasked key blocks with a masked tail, the accumulation inside the dot, and tiles.

Each configuration runs the whole op (`kernels.attention_triton.attention`: RoPE included), is
checked against the PyTorch reference first, then timed by CUDA events in a CUDA graph (as the
engine runs it by default; launch overhead out). The baselines, timed the same way in the same run:
SDPA alone on q and k already rotated (the target), and RoPE (the reference's torch ops) + SDPA.
    python bench/attn_sweep.py [--json FILE]   # a line per shape and configuration, the best per
                                               # shape, and the best over all shapes
    python bench/attn_sweep.py --smoke         # the same steps on a CPU (interpreter, tiny shapes,
                                               # wall time): checks this script only
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

H, DH = 16, 64
SHAPES = [(3, 1000), (24, 1000), (3, 1500), (24, 1500)]   # (rows, frames): batch 1 and 8 with multi CFG
TILES = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4)]   # (BLOCK_M, BLOCK_N, warps, stages): the best three of
# the H200 tile sweep of the flash kernel alone (bench/RESULTS.md)
OPTIONS = [(rope, split, acc) for rope, split, acc in itertools.product(("kernel", "q", "fused"), (False, True),
                                                                            (False, True))]


def configs(smoke: bool):
    from stemgen.kernels.attention_triton import FlashConfig

    if smoke:   # every option once, on one small tile
        return [FlashConfig(16, 16, 4, 1, *o) for o in [("kernel", False, False), ("q", True, False),
                                                         ("fused", False, True), ("fused", True, True)]]
    return [FlashConfig(bm, bn, w, s, *o) for (bm, bn, w, s), o in itertools.product(TILES, OPTIONS)]


def label(c) -> str:
    return (f"({c.block_m}, {c.block_n}, {c.warps}, {c.stages}) rope={c.rope} split_tail={int(c.split_tail)} "
            f"acc_in_dot={int(c.acc_in_dot)}")


def timer(smoke: bool):
    """ms per call: CUDA events over a CUDA graph of the call on a GPU; wall time on a CPU (smoke)."""
    if smoke:
        def wall(fn):
            fn()
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        return wall
    from triton.testing import do_bench_cudagraph
    return lambda fn: do_bench_cudagraph(fn, rep=50)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("--smoke", action="store_true", help="a CPU check of this script (interpreter, tiny shapes)")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"     # before Triton is imported
    elif not torch.cuda.is_available():
        raise SystemExit("attn_sweep.py times GPU kernels: it needs a CUDA device (or --smoke, a CPU check)")
    import triton

    from stemgen.kernels.attention import attention_ref, cu_seqlens, rope_ref
    from stemgen.kernels.attention_triton import attention, attention_config

    dev, dt = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    heads, dh, shapes = (2, 32, [(2, 40)]) if args.smoke else (H, DH, SHAPES)
    bench = timer(args.smoke)
    default = attention_config(dt, dh)
    name = "CPU (smoke)" if args.smoke else torch.cuda.get_device_name()
    print(f"device {name}, torch {torch.__version__}, triton {triton.__version__}; engine's configuration: "
          f"{label(default)}")
    report = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "default": label(default),
              "shapes": []}
    ratios: dict[str, list[float]] = {}
    for rows, T in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = torch.randn(rows * T, 3, heads, dh, device=dev, generator=g, dtype=dt).unbind(1)
        ang = torch.outer(torch.arange(T, dtype=torch.float64),
                          1 / 10000 ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh))
        cos, sin = ang.cos().float().to(dev), ang.sin().float().to(dev)
        segs = [(rows, T)]
        cu = cu_seqlens(segs, q.device)
        ref = attention_ref(q.float(), k.float(), v.float(), segs, cos, sin)
        pc, ps = cos.repeat(rows, 1), sin.repeat(rows, 1)
        qr, kr = rope_ref(q, pc, ps), rope_ref(k, pc, ps)
        qs, ks, vs = (z.reshape(rows, T, heads, dh).transpose(1, 2) for z in (qr, kr, v))
        t_sdpa = bench(lambda: F.scaled_dot_product_attention(qs, ks, vs))
        t_ref = bench(lambda: attention_ref(q, k, v, segs, cos, sin))
        flops = 4 * rows * T * T * heads * dh
        print(f"rows {rows} T {T}: SDPA alone {t_sdpa * 1e3:.1f} us ({flops / t_sdpa / 1e9:.0f} TFLOP/s), "
              f"RoPE + SDPA (reference) {t_ref * 1e3:.1f} us")
        entry = {"rows": rows, "frames": T, "sdpa_us": t_sdpa * 1e3, "rope_sdpa_us": t_ref * 1e3, "configs": []}
        for c in configs(args.smoke):
            try:
                out = attention(q, k, v, segs, cos, sin, cu_seqlens=cu, config=c)
                err = (out.float() - ref).abs().max().item()
                if err > 3e-2 * ref.abs().max().item():
                    print(f"  {label(c)}: WRONG (max err {err:.3g})")
                    continue
                t = bench(lambda: attention(q, k, v, segs, cos, sin, cu_seqlens=cu, config=c))
            except Exception as e:  # out of shared memory / registers for this tile
                print(f"  {label(c)}: failed ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
                continue
            mark = "  (engine's)" if c == default else ""
            print(f"  {label(c)}: {t * 1e3:.1f} us, {t_sdpa / t:.2f}x SDPA alone, {t_ref / t:.2f}x RoPE + SDPA{mark}")
            entry["configs"].append({"config": label(c), "us": t * 1e3, "vs_sdpa": t_sdpa / t})
            ratios.setdefault(label(c), []).append(t_sdpa / t)
        if entry["configs"]:
            best = max(entry["configs"], key=lambda e: e["vs_sdpa"])
            print(f"best rows {rows} T {T}: {best['config']} {best['us']:.1f} us = {best['vs_sdpa']:.2f}x SDPA alone")
        report["shapes"].append(entry)
    complete = {k: statistics.geometric_mean(r) for k, r in ratios.items() if len(r) == len(shapes)}
    if complete:
        best = max(complete, key=complete.get)
        report["best"] = {"config": best, "geomean_vs_sdpa": complete[best]}
        print(f"best over all shapes (geometric mean of x SDPA alone): {best}: {complete[best]:.2f}x"
              + (f"; the engine's: {complete[label(default)]:.2f}x" if label(default) in complete else ""))
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
