"""`stemgen bench`: whole generations with the engine and, in the same process, the baseline a
careful user of the peers would run — the training-form model, eager, no_grad, fp32, the guidance
rows of all requests batched together (as audiocraft does), every level's head computed, the same
sampler (same schedule, ranking, guidance and noise)."""
from __future__ import annotations

import os
import platform
import resource
import time
from dataclasses import dataclass

import torch

from .engine.config import LMConfig, SamplingConfig
from .engine.memory import keep_freed_memory
from .engine.request import Request, check_steps, guidance_rows, masked_after_step
from .engine.runner import Runner, StepLoop
from .kernels.sampling import guide_sample_rank_ref


@torch.no_grad()
def baseline_generate(model, cfg: LMConfig, contexts: torch.Tensor, conditions: torch.Tensor,
                      samplings: list[SamplingConfig]) -> tuple[torch.Tensor, int]:
    """Lockstep generation of B requests of the same length and steps with the training-form
    model. contexts [B, C-1, Q, T], conditions [B, S]. Returns (tokens [B, Q, T], forwards run)."""
    B, _, Q, T = contexts.shape
    dev = contexts.device
    steps = samplings[0].steps
    tokens = torch.full((B, Q, T), cfg.mask_id, dtype=torch.int64, device=dev)
    weights = [torch.tensor(s.guidance_weights(), device=dev) for s in samplings]
    positions = torch.arange(T, device=dev)
    forwards = 0
    for q in range(Q):
        masked = torch.ones(B, T, dtype=torch.bool, device=dev)
        n_masked = T
        for t in range(steps[q]):
            n_keep = n_masked - masked_after_step(t, steps[q], T)
            if n_keep <= 0:
                continue
            rows = []
            for b in range(B):
                visible = tokens[b].clone()
                visible[q + 1:] = cfg.mask_id
                rows.append(guidance_rows(contexts[b], visible, conditions[b], samplings[b].guidance, cfg))
            logits = model(torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]))  # all heads
            forwards += 1
            start = 0
            for b, s in enumerate(samplings):
                R = rows[b][0].shape[0]
                tok, _, score = guide_sample_rank_ref(
                    logits[start: start + R, q], weights[b], positions, masked[b], T, seed=s.seed, level=q, step=t,
                    temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, w_confidence=s.w_confidence,
                    w_causal=s.w_causal, w_random=s.w_random)
                start += R
                keep = score.topk(n_keep).indices
                tokens[b, q, keep] = tok[keep]
                masked[b, keep] = False
            n_masked -= n_keep
    return tokens, forwards


def engine_generate(runner, contexts: torch.Tensor, conditions: torch.Tensor, samplings: list[SamplingConfig],
                    max_frames: int = 1 << 20) -> tuple[torch.Tensor, int]:
    """The engine's batched step loop (``runner``: an engine.runner.Runner, or an engine LM)."""
    sched = StepLoop(runner, max_frames=max_frames)
    lm = sched.runner.model
    reqs = [Request(lm.cfg, contexts[b], conditions[b], s) for b, s in enumerate(samplings)]
    for r in reqs:
        sched.submit(r)
    forwards = 0
    while sched.has_work:
        sched.step()
        forwards += 1
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    return torch.stack([r.tokens.cpu() for r in reqs]), forwards


class PeakMemory:
    """Peak memory of one run: CUDA allocator peak, or the process's peak RSS (Linux: reset first)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.kind = "cuda max allocated"
        else:
            self.mb, self.kind = _rss_peak_mb(), "process peak RSS"


def _rss_peak_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class RunStats:
    name: str
    batch: int
    wall_s: float
    forwards: int
    rows_per_request: int
    frames: int
    frame_rate: float
    peak_mb: float
    memory_kind: str

    def as_dict(self) -> dict:
        audio_s = self.batch * self.frames / self.frame_rate
        return {"name": self.name, "batch": self.batch, "wall_s": self.wall_s, "forwards": self.forwards,
                "step_latency_ms": 1000 * self.wall_s / max(self.forwards, 1),
                "transformer_passes_per_s": self.forwards * self.batch * self.rows_per_request / self.wall_s,
                "frames_per_s": self.batch * self.frames / self.wall_s,
                "audio_s_per_wall_s": audio_s / self.wall_s, "peak_mb": self.peak_mb,
                "memory_kind": self.memory_kind}


CPU_ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def isa_limits() -> dict[str, str]:
    """The GEMM libraries' instruction-set limits set in the environment (a stand-in for another CPU)."""
    return {k: os.environ[k] for k in CPU_ISA_LIMITS if os.environ.get(k)}


def machine_info(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "processor": cpu_name(), "cpu_features": cpu_features(), "cpu_threads": torch.get_num_threads(),
            "cores": os.cpu_count(), "device": str(device)}
    held = isa_limits()
    if held:   # GEMM libraries held to a lower instruction set (a stand-in for another CPU): say so
        info["cpu_isa_limits"] = held
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        if os.environ.get("STEMGEN_FLASH_CONFIG"):   # a run trying another attention configuration
            info["flash_config"] = os.environ["STEMGEN_FLASH_CONFIG"]
    return info


def cpu_label(dtype=None) -> str:
    """One line for a report: the CPU and its GEMM features, the GEMM libraries' instruction-set limits
    where set (a stand-in for another CPU), and for int8 the weight codes its int8 GEMM sums exactly."""
    held = " ".join(f"{k}={v}" for k, v in isa_limits().items())
    text = f"{cpu_name()} ({cpu_features()})" + (f", held to {held}" if held else "")
    if dtype is not None and str(dtype).replace("torch.", "") == "int8":
        from .kernels.int8_linear import weight_code_max
        text += f"; int8 weight codes {weight_code_max()[1]}"
    return text


MATRIX_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_features() -> str:
    """The instruction sets that decide the CPU's GEMM speed per dtype, e.g. 'avx2 avx512f avx512_vnni
    avx512_bf16' (no AMX): a model name such as 'AMD EPYC' alone does not tell one machine from another."""
    from .engine.model import read_cpu_flags
    flags = read_cpu_flags()
    return " ".join(x for x in MATRIX_FEATURES if x in flags) or "none of " + ", ".join(MATRIX_FEATURES)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def build_models(model_dir, config_name: str, device: torch.device, dtype, baseline: bool, seed: int):
    """-> (engine LM, training-form baseline model or None, frame rate, description)."""
    from .engine.config import ModelConfig
    from .engine.architectures import lm_from_state
    from .train import StemGenConfig, StemGenLM, preset
    from .weights_convert.lm import convert_train_state, engine_lm_config, train_state_from_engine

    if model_dir is not None:
        from .engine.architectures import expected_shapes
        from .engine.tensors import read_weights
        mc = ModelConfig.load(model_dir)
        state = read_weights(mc.file(model_dir, "lm"), expected_shapes(mc.lm), "the LM config", "tensor",
                             "re-run `stemgen convert`")
        lm = lm_from_state(mc.lm, state, device, dtype)
        frame_rate = 50.0
        if mc.codec:
            from .engine.codec import CodecConfig
            frame_rate = CodecConfig.from_dict(mc.codec).frame_rate
        base = None
        if baseline:
            c = mc.lm
            tcfg = StemGenConfig(d_model=c.d_model, n_heads=c.n_heads, n_layers=c.n_layers, n_q=c.n_q,
                                 codebook_size=c.codebook_size, n_channels=c.n_channels,
                                 instruments=list(mc.instruments), extra_cond_sizes=list(c.cond_sizes[1:]),
                                 ffn_hidden=c.ffn_hidden, rope_theta=c.rope_theta, norm_eps=c.norm_eps)
            base = StemGenLM(tcfg)
            base.load_state_dict(train_state_from_engine(tcfg, {k: v.float() for k, v in state.items()}))
            base = base.to(device).eval()
        return lm, base, frame_rate, f"model {model_dir}"
    torch.manual_seed(seed)
    tcfg = preset(config_name)
    base = StemGenLM(tcfg).eval()
    lm = lm_from_state(engine_lm_config(tcfg), convert_train_state(tcfg, base.state_dict()), device, dtype)
    base = base.to(device) if baseline else None
    return lm, base, 50.0, f"preset {config_name!r} (random weights)"


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    return out, wall, mem


def run_bench(*, model_dir=None, config_name: str = "small", duration: float = 10.0,
              steps: tuple[int, ...] = (16, 8, 4, 4), batches: tuple[int, ...] = (1, 8), device="cpu",
              dtype=None, baseline: bool = True, guidance: str = "multi", seed: int = 0,
              cuda_graphs: bool | None = None, load: int = 0, repeat: int = 1, log=print) -> dict:
    """``load``: busy-loop processes started before and stopped after the whole run (a busy machine).
    ``repeat``: each batch's engine and baseline runs, alternating (engine first, then the baseline
    first, ...), so a machine's drift between runs falls on both sides; each side's best wall time is
    its figure (all of them are kept in ``walls_s``)."""
    if not 0 <= load <= 64:
        raise ValueError(f"--load must be 0-64 busy processes, got {load}")
    if not 1 <= repeat <= 20:
        raise ValueError(f"--repeat must be 1-20 runs of each side, got {repeat}")
    with BusyLoad(load):
        return _run_bench(model_dir, config_name, duration, steps, batches, device, dtype, baseline, guidance, seed,
                          cuda_graphs, load, repeat, log)


class BusyLoad:
    """``n`` processes that each keep one core busy (a spin loop in a fresh Python), for a context."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self):
        import subprocess
        import sys
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def _best(runs: list) -> tuple:
    """runs of _timed: (output of the first, the best wall, its memory, every wall)."""
    walls = [w for _, w, _ in runs]
    best = min(range(len(runs)), key=walls.__getitem__)
    return runs[0][0], walls[best], runs[best][2], walls


def _run_bench(model_dir, config_name, duration, steps, batches, device, dtype, baseline, guidance, seed, cuda_graphs,
               load, repeat, log) -> dict:
    from .engine.api import pick_device, use_cuda_graphs
    from .engine.model import default_dtype, resolve_dtype

    device = pick_device(device)
    dtype = resolve_dtype(dtype) if dtype else default_dtype(device)
    lm, base, frame_rate, desc = build_models(model_dir, config_name, device, dtype, baseline, seed)
    runner = Runner(lm, graphs=use_cuda_graphs(lm, cuda_graphs))
    # one process, one allocator: set before either side runs, so both run under it
    memory = keep_freed_memory() if device.type == "cpu" else None
    cfg = lm.cfg
    check_steps(steps, cfg.n_q)
    T = max(1, round(duration * frame_rate))
    n_params = sum(p.numel() for p in lm.parameters())
    log(f"bench: {desc}, {n_params / 1e6:.1f}M parameters, {T} frames ({T / frame_rate:.1f} s), steps "
        f"{list(steps)}, guidance {guidance}, engine {str(dtype).replace('torch.', '')} on {device}"
        f"{' with CUDA graphs' if runner.graphs is not None else ''}, "
        f"baseline {'fp32 training-form model' if base is not None else 'off'}"
        + (f"; CPU memory, both sides: {memory}" if memory else ""))
    # warm-up (allocators, kernels, thread pools) on a short run of each path; on CUDA each batch
    # size is warmed up below with its own work (Triton compiles per shape and count)
    g = torch.Generator().manual_seed(seed)
    warm_ctx = torch.randint(0, cfg.codebook_size, (1, cfg.n_channels - 1, cfg.n_q, min(T, 16)), generator=g)
    warm = [SamplingConfig(steps=(1,) * cfg.n_q, guidance=guidance)]
    engine_generate(runner, warm_ctx, torch.zeros(1, len(cfg.cond_sizes), dtype=torch.long), warm)
    if base is not None:
        baseline_generate(base, cfg, warm_ctx.to(device), torch.zeros(1, len(cfg.cond_sizes), dtype=torch.long,
                                                                      device=device), warm)
    results = []
    for B in batches:
        ctx = torch.randint(0, cfg.codebook_size, (B, cfg.n_channels - 1, cfg.n_q, T), generator=g)
        cond = torch.stack([torch.randint(0, n, (B,), generator=g) for n in cfg.cond_sizes], dim=1)
        samplings = [SamplingConfig(steps=steps, guidance=guidance, seed=seed + b) for b in range(B)]
        rows = len(samplings[0].guidance_weights())
        if device.type == "cuda":   # Triton specialises on counts that change step by step: an
            engine_generate(runner, ctx, cond, samplings)  # untimed run of the same work compiles them all
        sides = {"engine": lambda: engine_generate(runner, ctx, cond, samplings)}
        if base is not None:
            sides["baseline"] = lambda: baseline_generate(base, cfg, ctx.to(device), cond.to(device), samplings)
        runs = {name: [] for name in sides}
        for i in range(repeat):   # alternating: engine, baseline, baseline, engine, ...
            for name in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
                runs[name].append(_timed(sides[name], device))
        (tok_e, fw_e), wall_e, mem_e, walls_e = _best(runs["engine"])
        entry = {"batch": B, "engine": RunStats("engine", B, wall_e, fw_e, rows, T, frame_rate, mem_e.mb,
                                                mem_e.kind).as_dict() | {"walls_s": walls_e}}
        if base is not None:
            (tok_b, fw_b), wall_b, mem_b, walls_b = _best(runs["baseline"])
            entry["baseline"] = RunStats("baseline", B, wall_b, fw_b, rows, T, frame_rate, mem_b.mb,
                                         mem_b.kind).as_dict() | {"walls_s": walls_b}
            entry["speedup_frames_per_s"] = wall_b / wall_e
            entry["token_agreement"] = float((tok_b.cpu() == tok_e).float().mean())
        results.append(entry)
        every = "; ".join(f"{name} " + " ".join(f"{w:.2f}" for w in entry[name]["walls_s"]) for name in runs)
        log(f"batch {B}: engine {wall_e:.2f} s" + (f", baseline {entry['baseline']['wall_s']:.2f} s, "
                                                   f"ratio {entry['speedup_frames_per_s']:.2f}x" if base is not None else "")
            + (f" (best of {repeat}: {every})" if repeat > 1 else ""))
    sat = saturation([(r["batch"], r["engine"]["frames_per_s"]) for r in results])
    if sat is not None:
        log(f"throughput saturates at batch {sat['batch']} ({sat['frames_per_s']:.0f} frames/s, within "
            f"{100 * (1 - SATURATION):.0f}% of the best)" + ("" if sat["reached"] else
                                                            "; not reached: try larger batches"))
    return {"machine": machine_info(device),
            "settings": {"model": desc, "parameters": n_params, "frames": T, "frame_rate": frame_rate,
                         "duration_s": T / frame_rate, "steps": list(steps), "guidance": guidance,
                         "engine_dtype": str(dtype).replace("torch.", ""),
                         "baseline_dtype": "float32" if base is not None else None,
                         "cuda_graphs": runner.graphs is not None, "load": load, "repeat": repeat, "cpu_memory": memory,
                         "batches": list(batches)},
            "results": results, "saturation": sat}


SATURATION = 0.9


def rate(x: float) -> str:
    """A throughput for a table: whole numbers from 10 up, three significant digits below (a
    paper-size model on a CPU makes 0.28 frames/s, not 0)."""
    return f"{x:.0f}" if x >= 10 else f"{x:.3g}"


def result_rows(report: dict):
    """Yield (result entry, 'engine' or 'baseline', that run's figures) in table order."""
    for r in report["results"]:
        for name in ("engine", "baseline"):
            if name in r:
                yield r, name, r[name]


def saturation(points: list[tuple[int, float]]) -> dict | None:
    """The smallest batch size whose throughput is within 10% of the best measured: where more
    concurrent requests stop paying. ``reached`` is false when that is the largest batch tried
    (throughput may still be growing). None for fewer than two batch sizes."""
    if len(points) < 2:
        return None
    points = sorted(points)
    best = max(f for _, f in points)
    batch, fps = next((b, f) for b, f in points if f >= SATURATION * best)
    return {"batch": batch, "frames_per_s": fps, "best_frames_per_s": best, "reached": batch < points[-1][0]}
