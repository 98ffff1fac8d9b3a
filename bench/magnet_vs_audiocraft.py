"""MAGNeT generation, audiocraft 1.3.0's own code against the engine, on the same checkpoint, in one
process, alternating runs (A B A B ...): wall time, frames/s and the ratio per batch size.

Runs in the audiocraft reference venv (it sees the project's packages):

    ../shared/tools/audiocraft-ref.sh .venv /tmp/acref
    .venv/bin/stemgen convert --lm CKPT/state_dict.bin --text-encoder T5_FOLDER --out ENGINE_MODEL
    PYTHONPATH=/tmp/acref/audiocraft-1.3.0 /tmp/acref/venv/bin/python bench/magnet_vs_audiocraft.py \\
        --ckpt CKPT/state_dict.bin --t5 T5_FOLDER --engine-model ENGINE_MODEL --batch 1 --json out.json

Both sides generate tokens only (no codec), from the same prompts, with the same settings (default:
10 s, steps 20,10,10,10, nonoverlap, top-p 0.9, temperature 3.0 annealed, CFG 10 -> 1). audiocraft runs
its CPU path (xformers does not load on a CPU: its torch attention backend, which replaces the band
of levels >= 1 by a causal mask; the same work). audiocraft is never a dependency of the project.
"""
from __future__ import annotations

import argparse
import json
import platform
import site
import statistics
import sys
import time
from pathlib import Path


def project_packages() -> None:
    """The reference venv lists the project venv's site-packages as a plain path (a .pth line), so its
    editable install's own .pth is not processed: process it."""
    for p in list(sys.path):
        if p.endswith("site-packages") and Path(p, "__editable__.stemgen-0.1.0.pth").exists():
            site.addsitedir(p)
    try:
        import stemgen  # noqa: F401
    except ImportError:
        for p in list(sys.path):
            if p.endswith("site-packages"):
                site.addsitedir(p)


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def audiocraft_lm(ckpt: str, t5_folder: str):
    import torch
    import transformers
    import audiocraft.modules.conditioners as C
    from audiocraft.models.loaders import load_lm_model_magnet
    from audiocraft.modules import transformer as actr

    width = transformers.AutoConfig.from_pretrained(t5_folder).d_model

    class Tok:
        @staticmethod
        def from_pretrained(name, *a, **k):
            return transformers.AutoTokenizer.from_pretrained(t5_folder)

    class Enc:
        @staticmethod
        def from_pretrained(name, *a, **k):
            return transformers.T5EncoderModel.from_pretrained(t5_folder)

    C.T5Tokenizer, C.T5EncoderModel = Tok, Enc   # its conditioner only knows hub names
    import yaml
    xp = yaml.safe_load(torch.load(ckpt, map_location="cpu", weights_only=True)["xp.cfg"])
    name = xp["conditioners"]["description"]["t5"]["name"]
    C.T5Conditioner.MODELS_DIMS = {**C.T5Conditioner.MODELS_DIMS, name: width}
    lm = load_lm_model_magnet(ckpt, compression_model_frame_rate=50, device="cpu")
    actr.set_efficient_attention_backend("torch")   # xformers' ops do not load on a CPU
    return lm.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--t5", required=True)
    ap.add_argument("--engine-model", required=True)
    ap.add_argument("--batch", default="1")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--steps", default="20,10,10,10")
    ap.add_argument("--span-arrangement", default="nonoverlap")
    ap.add_argument("--engine-dtypes", default="float32", help="engine dtypes to time, e.g. float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json")
    a = ap.parse_args()
    project_packages()
    import torch
    from audiocraft.modules.conditioners import ConditioningAttributes

    from stemgen.engine import Engine
    if a.threads:
        torch.set_num_threads(a.threads)
    steps = [int(s) for s in a.steps.split(",")]
    T = int(round(a.seconds * 50))
    prompts = ["90s rock with heavy drums", "calm piano", "lofi hip hop beat", "epic orchestral score",
               "funky bass groove", "ambient synth pad", "jazz trio with brushes", "techno with a four on the floor"]
    lm = audiocraft_lm(a.ckpt, a.t5)
    engines = {dt: Engine.from_pretrained(a.engine_model, device="cpu", dtype=dt) for dt in a.engine_dtypes.split(",")}

    def run_audiocraft(B, steps=steps):
        attrs = [ConditioningAttributes(text={"description": prompts[i % len(prompts)]}) for i in range(B)]
        with torch.no_grad():
            out = lm.generate(conditions=attrs, max_gen_len=T, use_sampling=True, temp=3.0, top_p=0.9, top_k=0,
                              decoding_steps=steps, max_cfg_coef=10.0, min_cfg_coef=1.0,
                              span_arrangement=a.span_arrangement)
        return out.shape[-1]

    def run_engine(engine, B, steps=steps):
        out = engine.generate_text_tokens([prompts[i % len(prompts)] for i in range(B)], frames=T, steps=tuple(steps),
                                          span_arrangement=a.span_arrangement)
        return out[0].shape[-1]

    report = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "checkpoint": a.ckpt, "d_model": lm.dim, "layers": len(lm.transformer.layers), "seconds": a.seconds,
              "steps": steps, "span_arrangement": a.span_arrangement, "results": []}
    print(f"{report['cpu']}, {report['threads']} threads, torch {torch.__version__}; d {lm.dim}, "
          f"{report['layers']} layers; {a.seconds:g} s, steps {a.steps}", flush=True)
    for B in [int(b) for b in a.batch.split(",")]:
        runs = {"audiocraft fp32": lambda: run_audiocraft(B)}
        runs.update({f"engine {dt}": (lambda e=e: run_engine(e, B)) for dt, e in engines.items()})
        run_audiocraft(B, [1] * len(steps))   # warm-up (first-call allocations, T5), untimed
        for e in engines.values():
            run_engine(e, B, [1] * len(steps))
        times = {k: [] for k in runs}
        frames = {}
        for _ in range(a.repeats):
            for name, fn in runs.items():   # alternating: drift hits every side alike
                t0 = time.perf_counter()
                frames[name] = fn()
                times[name].append(time.perf_counter() - t0)
                print(f"  batch {B} {name}: {times[name][-1]:.1f} s", flush=True)
        base = statistics.median(times["audiocraft fp32"])
        for name, ts in times.items():
            wall = statistics.median(ts)
            row = {"batch": B, "impl": name, "wall_s": ts, "median_s": wall, "frames": frames[name],
                   "frames_per_s": B * frames[name] / wall, "x_audiocraft": base / wall}
            report["results"].append(row)
            print(f"batch {B:2d} {name:18s} {wall:8.1f} s  {row['frames_per_s']:7.1f} frames/s  "
                  f"{row['x_audiocraft']:.2f}x audiocraft", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
