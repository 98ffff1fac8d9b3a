"""MAGNeT generation, audiocraft 1.3.0's own code against the engine, on the same checkpoint, in one
process, alternating runs (A B A B ...): wall time, frames/s and the ratio per batch size.

Runs in the audiocraft reference venv (it sees the project's packages):

    ../shared/tools/audiocraft-ref.sh .venv /tmp/acref
    .venv/bin/stemgen convert --lm CKPT/state_dict.bin --text-encoder T5_FOLDER --out ENGINE_MODEL
    PYTHONPATH=/tmp/acref/audiocraft-1.3.0 /tmp/acref/venv/bin/python bench/magnet_vs_audiocraft.py \\
        --ckpt CKPT/state_dict.bin --t5 T5_FOLDER --engine-model ENGINE_MODEL --batch 1 --json out.json

Without audiocraft (a GPU machine, say) it times the engine alone; ``--random-small`` builds a random
MAGNeT-small-shaped engine model (d 1024, 24 layers, 16 heads, card 2048, a random 2-layer T5 of
width 768) instead of converting a checkpoint:

    python bench/magnet_vs_audiocraft.py --random-small --device cuda --engine-dtypes bfloat16 --batch 1,16

Both sides generate tokens only (no codec), from the same prompts, with the same settings (default:
10 s, steps 20,10,10,10, nonoverlap, top-p 0.9, temperature 3.0 annealed, CFG 10 -> 1). audiocraft runs
its CPU path (xformers does not load on a CPU: its torch attention backend, which replaces the band
of levels >= 1 by a causal mask; the same work). audiocraft is never a dependency of the project.
"""
from __future__ import annotations

import argparse
import json
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


def random_small(out: Path, d: int = 1024, layers: int = 24, heads: int = 16, card: int = 2048) -> Path:
    """A random MAGNeT engine model of the small size, in ``out`` (engine format; no audiocraft)."""
    import torch

    from stemgen.engine.text import _transformers   # (hides a source tree's kernels/ from transformers)
    tf = _transformers()
    AutoTokenizer, T5Config, T5EncoderModel = tf.AutoTokenizer, tf.T5Config, tf.T5EncoderModel
    from stemgen.engine.config import LM_WEIGHTS, MagnetConfig, ModelConfig, magnet_sampling_defaults
    from stemgen.engine.magnet import magnet_shapes
    from stemgen.engine.text import TEXT_ENCODER_DIR
    from stemgen.weights_convert.writer import write_model_dir

    if (out / "config.json").is_file():
        return out
    cfg = MagnetConfig(d_model=d, n_heads=heads, n_layers=layers, n_q=4, codebook_size=card, ffn_hidden=4 * d,
                       text_dim=768)
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=g) / (s[-1] ** 0.5 if len(s) > 1 else 1.0)).half()
             if len(s) > 1 else 1 + 0.1 * torch.randn(s, generator=g) for k, s in magnet_shapes(cfg).items()}
    config = ModelConfig(lm=cfg, instruments=[], sampling=magnet_sampling_defaults(), dtype="float16",
                         weights={"lm": LM_WEIGHTS, "codec": None, "text_encoder": TEXT_ENCODER_DIR}, window=500)
    tiny = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "magnet" / "t5-tiny"

    def t5(tmp):
        torch.manual_seed(0)
        T5EncoderModel(T5Config(d_model=768, d_kv=64, num_heads=12, num_layers=2, d_ff=3072,
                                vocab_size=len(AutoTokenizer.from_pretrained(tiny)))).save_pretrained(tmp / TEXT_ENCODER_DIR)
        AutoTokenizer.from_pretrained(tiny).save_pretrained(tmp / TEXT_ENCODER_DIR)

    return write_model_dir(out, config, {"lm": state}, extra=t5)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", help="audiocraft state_dict.bin (omit: engine only)")
    ap.add_argument("--t5", help="the T5 folder of --ckpt")
    ap.add_argument("--engine-model", help="the converted engine model directory")
    ap.add_argument("--random-small", metavar="DIR", nargs="?", const="/tmp/stemgen-magnet-small",
                    help="build (once) and time a random MAGNeT-small engine model in DIR; engine only")
    ap.add_argument("--random-size", default="1024,24,16", help="d_model,layers,heads of --random-small")
    ap.add_argument("--device", default="cpu")
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

    from stemgen.bench import cpu_features, cpu_name, machine_info
    from stemgen.engine import Engine
    if a.threads:
        torch.set_num_threads(a.threads)
    steps = [int(s) for s in a.steps.split(",")]
    T = int(round(a.seconds * 50))
    prompts = ["90s rock with heavy drums", "calm piano", "lofi hip hop beat", "epic orchestral score",
               "funky bass groove", "ambient synth pad", "jazz trio with brushes", "techno with a four on the floor"]
    if a.random_small:
        d, layers, heads = (int(x) for x in a.random_size.split(","))
        a.engine_model = str(random_small(Path(a.random_small), d, layers, heads))
    if not a.engine_model:
        ap.error("give --engine-model (with --ckpt and --t5 for audiocraft) or --random-small")
    lm = audiocraft_lm(a.ckpt, a.t5) if a.ckpt else None
    engines = {dt: Engine.from_pretrained(a.engine_model, device=a.device, dtype=dt)
               for dt in a.engine_dtypes.split(",")}

    def run_audiocraft(B, steps=steps):
        from audiocraft.modules.conditioners import ConditioningAttributes
        attrs = [ConditioningAttributes(text={"description": prompts[i % len(prompts)]}) for i in range(B)]
        with torch.no_grad():
            out = lm.generate(conditions=attrs, max_gen_len=T, use_sampling=True, temp=3.0, top_p=0.9, top_k=0,
                              decoding_steps=steps, max_cfg_coef=10.0, min_cfg_coef=1.0,
                              span_arrangement=a.span_arrangement)
        return out.shape[-1]

    def run_engine(engine, B, steps=steps):
        out = engine.generate_text_tokens([prompts[i % len(prompts)] for i in range(B)], frames=T, steps=tuple(steps),
                                          span_arrangement=a.span_arrangement)
        if engine.lm.device.type == "cuda":
            torch.cuda.synchronize()
        return out[0].shape[-1]

    mcfg = next(iter(engines.values())).config.lm
    report = {"cpu": cpu_name(), "cpu_features": cpu_features(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "device": a.device + (f" ({torch.cuda.get_device_name()})" if a.device == "cuda" else ""),
              "checkpoint": a.ckpt or a.engine_model, "d_model": mcfg.d_model, "layers": mcfg.n_layers,
              "seconds": a.seconds, "steps": steps, "span_arrangement": a.span_arrangement, "results": []}
    held = machine_info(torch.device(a.device)).get("cpu_isa_limits")
    if held:   # GEMM libraries held to a lower instruction set: a stand-in run, said with its figures
        report["cpu_isa_limits"] = held
        print("GEMM libraries held by " + " ".join(f"{k}={v}" for k, v in held.items()), flush=True)
    print(f"{report['cpu']}, {report['threads']} threads, torch {torch.__version__}, {report['device']}; "
          f"d {mcfg.d_model}, {mcfg.n_layers} layers; {a.seconds:g} s, steps {a.steps}", flush=True)
    for B in [int(b) for b in a.batch.split(",")]:
        runs = {"audiocraft fp32": lambda: run_audiocraft(B)} if lm is not None else {}
        runs.update({f"engine {dt}": (lambda e=e: run_engine(e, B)) for dt, e in engines.items()})
        if lm is not None:
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
        base = statistics.median(times["audiocraft fp32"]) if lm is not None else None
        for name, ts in times.items():
            wall = statistics.median(ts)
            row = {"batch": B, "impl": name, "wall_s": ts, "median_s": wall, "frames": frames[name],
                   "frames_per_s": B * frames[name] / wall, "x_audiocraft": base / wall if base else None}
            report["results"].append(row)
            print(f"batch {B:2d} {name:18s} {wall:8.1f} s  {row['frames_per_s']:7.1f} frames/s"
                  + (f"  {row['x_audiocraft']:.2f}x audiocraft" if base else ""), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
