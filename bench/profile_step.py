"""Where a generation step's time goes: torch.profiler over a few scheduler steps of a batch of
requests (after warm-up), with every hot-path op, the trunk's GEMMs and the head GEMM wrapped in
named regions, so the step splits into: GEMMs (trunk), head GEMM, attention, norms, SwiGLU,
embedding-sum, guidance+sampling, and the rest (Python, scheduling, row building, allocator: the
step's wall time minus the named regions). Also the top ops by self time.

    python bench/profile_step.py                      # paper config, 20 s, multi CFG, on CUDA if present
    python bench/profile_step.py --config small --device cpu --frames 500 --batch 8 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import functools
import time

import torch

from stemgen.bench import build_models
from stemgen.engine import model as model_mod
from stemgen.engine.api import pick_device, use_cuda_graphs
from stemgen.engine.config import SamplingConfig
from stemgen.engine.model import default_dtype, resolve_dtype
from stemgen.engine.request import Request
from stemgen.engine.runner import Runner, StepLoop
from stemgen.kernels import OPS

CATEGORIES = {"embed_sum": "embedding-sum", "attention": "attention", "rms_norm": "norms",
              "add_rms_norm": "norms", "silu_mul": "SwiGLU (silu * up)", "guide_sample_rank": "guidance+sampling",
              "linear": "GEMMs (trunk)", "head_logits": "head GEMM", "fold_guidance": "head GEMM",
              "int8_swiglu": "int8 feed-forward (both GEMMs + SwiGLU)"}


_inside = []   # the named region running now: a GEMM inside the head's region is the head's


def _named(name: str, fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if _inside:
            return fn(*args, **kwargs)
        _inside.append(name)
        try:
            with torch.profiler.record_function(f"region::{name}"):
                return fn(*args, **kwargs)
        finally:
            _inside.pop()
    return wrapped


def breakdown(prof, wall_ms: float, steps: int) -> tuple[str, dict]:
    """ms per step per category from the named regions; 'other' = wall - named."""
    per = {}
    for ev in prof.key_averages():
        if ev.key.startswith("region::"):
            cat = CATEGORIES[ev.key.split("::", 1)[1]]
            t = ev.device_time_total if getattr(ev, "device_time_total", 0) else ev.cpu_time_total
            per[cat] = per.get(cat, 0.0) + t / 1000 / steps
    per["other (Python, scheduling, rows, allocator)"] = max(0.0, wall_ms - sum(per.values()))
    lines = [f"{'part of the step':46s} {'ms':>8s} {'share':>6s}"]
    for cat, ms in sorted(per.items(), key=lambda kv: -kv[1]):
        lines.append(f"{cat:46s} {ms:8.2f} {100 * ms / max(wall_ms, 1e-9):5.1f}%")
    return "\n".join(lines), per


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="paper")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: the device's default)")
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=1, help="requests stepping together")
    ap.add_argument("--steps", type=int, default=6, help="profiled steps")
    ap.add_argument("--cuda-graphs", action="store_true", help="replay the trunk from CUDA graphs (else eager)")
    ap.add_argument("--rows", type=int, default=25, help="rows of the top-ops table")
    args = ap.parse_args(argv)

    device = pick_device(args.device)
    dtype = resolve_dtype(args.dtype) if args.dtype else default_dtype(device)
    lm, _, _, desc = build_models(None, args.config, device, dtype, False, seed=0)
    try:
        runner = Runner(lm, graphs=use_cuda_graphs(lm, args.cuda_graphs))
    except ValueError as e:   # --cuda-graphs without a CUDA device
        ap.error(str(e))
    cfg = lm.cfg
    sampling = SamplingConfig(steps=(args.steps * 4 + 8,) + (1,) * (cfg.n_q - 1))
    loop = StepLoop(runner)
    g = torch.Generator().manual_seed(0)
    for _ in range(args.batch):
        ctx = torch.randint(0, cfg.codebook_size, (cfg.n_channels - 1, cfg.n_q, args.frames), generator=g)
        loop.submit(Request(cfg, ctx, torch.zeros(len(cfg.cond_sizes), dtype=torch.long), sampling))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(4):   # warm-up: kernels compiled, caches (and graphs) built
        loop.step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loop.step()
    sync()
    wall = (time.perf_counter() - t0) / args.steps
    saved_ops = {op: getattr(lm.ops, op) for op in OPS}
    saved = {name: getattr(model_mod, name) for name in ("linear", "head_logits")}
    try:   # named regions (a little profiling overhead; the unprofiled wall time is above)
        for op, fn in saved_ops.items():
            setattr(lm.ops, op, _named(op, fn))
        for name, fn in saved.items():
            setattr(model_mod, name, _named(name, fn))
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                         if device.type == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            t1 = time.perf_counter()
            for _ in range(args.steps):
                loop.step()
            sync()
            wall_prof = (time.perf_counter() - t1) / args.steps
    finally:
        for op, fn in saved_ops.items():
            setattr(lm.ops, op, fn)
        for name, fn in saved.items():
            setattr(model_mod, name, fn)
    parts, _ = breakdown(prof, 1000 * wall_prof, args.steps)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=args.rows)
    rows = args.batch * (3 if sampling.guidance == "multi" else 2 if sampling.guidance == "single" else 1)
    head = (f"{desc}, batch {args.batch} x {args.frames} frames, {sampling.guidance} CFG ({rows} rows), "
            f"{str(dtype).replace('torch.', '')} on {device}"
            f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}"
            f"{', CUDA graphs' if runner.graphs is not None else ''}, {torch.get_num_threads()} threads: "
            f"{1000 * wall:.2f} ms per step (mean of {args.steps}, unprofiled; {1000 * wall_prof:.2f} profiled); "
            f"{args.batch * args.frames / wall:.0f} frames/s")
    report = head + "\n" + parts + "\n\n" + table
    print(report)
    return report


if __name__ == "__main__":
    main()
