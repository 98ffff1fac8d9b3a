"""The Triton attention op's configurations on a GPU against torch SDPA, at StemGen shapes (paper
model: 16 heads of 64, bf16): where RoPE happens (its own kernel, in the flash kernel for q, or for
q and k), unmasked key blocks with a masked tail, the accumulation inside the dot, k and v through
tensor descriptors (TMA), and tiles: every option on the engine's tile, then the best three options
on the other tiles.

Each configuration runs the whole op (`kernels.attention_triton.attention`: RoPE included), is
checked against the PyTorch reference first, then timed by CUDA events in a CUDA graph (as the
engine runs it by default; launch overhead out). The baselines, timed the same way in the same run:
SDPA alone on q and k already rotated (the target), and RoPE (the reference's torch ops) + SDPA.
    python bench/attn_sweep.py [--json FILE]   # a line per configuration (each shape's time, the
                                               # geometric mean of x SDPA), and the best of all
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
# the H200 tile sweep of the flash kernel alone (bench/RESULTS.md); the first is the engine's
OPTIONS = [(rope, split, acc, tma) for tma, rope, split, acc
           in itertools.product((False, True), ("kernel", "q", "fused"), (False, True), (False, True))]
# (rope, split_tail, acc_in_dot, tma): every option on the first tile, then the best TOP on the other tiles;
# the TMA options last, so that a CUDA error there (sticky: it ends the sweep) leaves the others timed
TOP = 3
SMOKE_TILES = [(16, 16, 4, 1), (16, 16, 2, 1)]
SMOKE_OPTIONS = [("kernel", False, False, False), ("q", True, False, True), ("fused", False, True, False),
                 ("fused", True, True, True)]


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
    return lambda fn: do_bench_cudagraph(fn, rep=20)


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
    from stemgen.kernels.attention_triton import FlashConfig, attention, attention_config

    dev, dt = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    heads, dh, shapes = (2, 32, [(2, 40)]) if args.smoke else (H, DH, SHAPES)
    tiles, options = (SMOKE_TILES, SMOKE_OPTIONS) if args.smoke else (TILES, OPTIONS)
    bench = timer(args.smoke)
    default = attention_config(dt, dh)
    name = "CPU (smoke)" if args.smoke else torch.cuda.get_device_name()
    print(f"device {name}, torch {torch.__version__}, triton {triton.__version__}; engine's configuration: "
          f"{default.text()}")
    report = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "default": default.text(),
              "shapes": [], "configs": []}
    cases = []
    for rows, T in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = torch.randn(rows * T, 3, heads, dh, device=dev, generator=g, dtype=dt).unbind(1)
        ang = torch.outer(torch.arange(T, dtype=torch.float64),
                          1 / 10000 ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh))
        cos, sin = ang.cos().float().to(dev), ang.sin().float().to(dev)
        segs = [(rows, T)]
        pc, ps = cos.repeat(rows, 1), sin.repeat(rows, 1)
        qs, ks, vs = (z.reshape(rows, T, heads, dh).transpose(1, 2) for z in (rope_ref(q, pc, ps), rope_ref(k, pc, ps), v))
        t_sdpa = bench(lambda: F.scaled_dot_product_attention(qs, ks, vs))
        t_ref = bench(lambda: attention_ref(q, k, v, segs, cos, sin))
        flops = 4 * rows * T * T * heads * dh
        print(f"rows {rows} x {T} frames: SDPA alone {t_sdpa * 1e3:.1f} us ({flops / t_sdpa / 1e9:.0f} TFLOP/s), "
              f"RoPE + SDPA (reference) {t_ref * 1e3:.1f} us")
        report["shapes"].append({"rows": rows, "frames": T, "sdpa_us": t_sdpa * 1e3, "rope_sdpa_us": t_ref * 1e3})
        cases.append(dict(qkv=(q, k, v), segs=segs, cos=cos, sin=sin, cu=cu_seqlens(segs, q.device), t_sdpa=t_sdpa,
                          ref=attention_ref(q.float(), k.float(), v.float(), segs, cos, sin)))

    def run(c) -> float | None:
        """Geometric mean over the shapes of SDPA's time / this configuration's; None if it failed."""
        times = []
        for case in cases:
            fn = lambda: attention(*case["qkv"], case["segs"], case["cos"], case["sin"], cu_seqlens=case["cu"],  # noqa: E731
                                   config=c)
            try:
                err = (fn().float() - case["ref"]).abs().max().item()
                if not err <= 3e-2 * case["ref"].abs().max().item():   # NaN too
                    print(f"  {c.text()}: WRONG (max err {err:.3g})")
                    return None
                times.append(bench(fn))
            except Exception as e:  # out of shared memory / registers for this tile, or a CUDA error
                text = str(e).strip()
                print(f"  {c.text()}: failed ({type(e).__name__}: {text.splitlines()[0][:120] if text else ''})")
                if "CUDA error" in text or "illegal" in text:   # sticky: every later launch would fail too
                    raise SystemExit(f"stopped: a CUDA error in {c.text()} leaves the device unusable; "
                                     f"the configurations before it are in the JSON")
                return None
        ratios = [case["t_sdpa"] / t for case, t in zip(cases, times)]
        mean = statistics.geometric_mean(ratios)
        print(f"  {c.text()}: " + ", ".join(f"{t * 1e3:.1f} us ({r:.2f}x)" for t, r in zip(times, ratios))
              + f"; geomean {mean:.2f}x SDPA alone{'  (engine)' if c == default else ''}")
        report["configs"].append({"config": c.text(), "us": [t * 1e3 for t in times], "vs_sdpa": ratios,
                                  "geomean_vs_sdpa": mean})
        report["best"] = max(report["configs"], key=lambda e: e["geomean_vs_sdpa"])
        save()   # after every configuration: a sweep cut short by a time limit keeps what it measured
        return mean

    def save():
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump(report, f, indent=1)
            os.replace(args.json + ".tmp", args.json)

    print("each configuration: per shape GPU time (x SDPA alone), then the geometric mean")
    first = {o: run(FlashConfig(*tiles[0], *o)) for o in options}
    ranked = sorted((o for o in first if first[o] is not None), key=first.get, reverse=True)[:TOP]
    for tile in tiles[1:]:
        for o in ranked:
            run(FlashConfig(*tile, *o))
    if report["configs"]:
        best = report["best"]
        print(f"best over all shapes: {best['config']}: {best['geomean_vs_sdpa']:.2f}x SDPA alone "
              f"(per shape {', '.join(f'{r:.2f}x' for r in best['vs_sdpa'])})")
    save()


if __name__ == "__main__":
    main()
