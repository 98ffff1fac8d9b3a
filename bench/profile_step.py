"""Where a generation step's time goes: torch.profiler over a few scheduler steps of one request
(after warm-up), the top kernels by device time (CUDA) or by CPU time, and the step's wall time.

    python bench/profile_step.py                      # paper config, 20 s, multi CFG, on CUDA if present
    python bench/profile_step.py --config tiny --device cpu --frames 50
"""
from __future__ import annotations

import argparse
import time

import torch

from stemgen.bench import build_models
from stemgen.engine.api import pick_device, use_cuda_graphs
from stemgen.engine.config import SamplingConfig
from stemgen.engine.model import default_dtype
from stemgen.engine.request import Request
from stemgen.engine.runner import Runner, StepLoop


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="paper")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=6, help="profiled steps")
    ap.add_argument("--cuda-graphs", action="store_true")
    ap.add_argument("--rows", type=int, default=25, help="table rows")
    args = ap.parse_args(argv)

    device = pick_device(args.device)
    lm, _, _, desc = build_models(None, args.config, device, default_dtype(device), False, seed=0)
    runner = Runner(lm, graphs=use_cuda_graphs(lm, args.cuda_graphs or None))
    cfg = lm.cfg
    ctx = torch.randint(0, cfg.codebook_size, (cfg.n_channels - 1, cfg.n_q, args.frames))
    sampling = SamplingConfig(steps=(args.steps * 4 + 8,) + (1,) * (cfg.n_q - 1))
    sched = StepLoop(runner)
    sched.submit(Request(cfg, ctx, torch.zeros(len(cfg.cond_sizes), dtype=torch.long), sampling))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(4):   # warm-up: kernels compiled, caches (and graphs) built
        sched.step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        sched.step()
    sync()
    wall = (time.perf_counter() - t0) / args.steps
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                     if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.steps):
            sched.step()
        sync()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=args.rows)
    head = (f"{desc}, {args.frames} frames, multi CFG (3 rows), {str(lm.dtype).replace('torch.', '')} on {device}"
            f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}"
            f"{', CUDA graphs' if runner.graphs is not None else ''}: {1000 * wall:.2f} ms per step (mean of "
            f"{args.steps}, unprofiled)")
    report = head + "\n" + table
    print(report)
    return report


if __name__ == "__main__":
    main()
