"""How far a MAGNeT engine model in bf16 or int8 moves the distribution a step samples from, against
fp32, with the guidance folded before the level head and with the head on every row.

For each prompt, the fp32 engine generates as `stemgen generate-text` would (its own sampling
decides every step), and the compared dtype's engine runs the same steps on the same tokens: at
every step both compute the level head's logits at the step's frames, and the guided distribution
(temperature 1; uncond + (cond - uncond) * coef, the step's CFG coefficient) of the compared model,
as its engine runs it (the head on the rows' weighted sum: kernels.guidance_fold), and with the head
on every row, is set against fp32's (the head on every row):

  guided total variation   per frame, mean and max over the steps' frames
  guided top-1             share of frames whose most likely code is fp32's

    .venv/bin/python bench/magnet_fidelity.py --engine-model DIR --dtype bfloat16 [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

PROMPTS = ["90s rock with heavy drums", "calm piano", "lofi hip hop beat", "funky bass groove"]


def _stats(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame: total variation between two log-distributions [M, V], and top-1 equality."""
    return 0.5 * (a.exp() - b.exp()).abs().sum(-1), a.argmax(-1) == b.argmax(-1)


def compare(fp32, other, prompt: str, frames: int, steps: tuple[int, ...], seed: int) -> dict:
    """Per level: lists of per-frame total variation and top-1 agreement, folded and every row."""
    from stemgen.kernels.guidance_fold import guided_distribution
    kw = dict(frames=frames, steps=steps, seed=seed)
    ref, cmp_ = fp32.text_request(prompt, **kw), other.text_request(prompt, **kw)
    ref.admit(torch.device("cpu"))
    cmp_.admit(torch.device("cpu"))
    out: dict = {}
    with torch.inference_mode():
        while not ref.done:
            ra, rb = ref.rows(True), cmp_.rows(True)
            w = ref.guidance()
            la = fp32.lm.level_logits([ra], fp32.lm.hidden([ra[:2]]))[0]
            xb = other.lm.hidden([rb[:2]])
            want = guided_distribution(la, w)
            level = out.setdefault(ra[2], {"folded": ([], []), "every row": ([], [])})
            for form, guidance in (("folded", [w]), ("every row", None)):
                tv, top1 = _stats(guided_distribution(other.lm.level_logits([rb], xb, guidance)[0], w), want)
                level[form][0].append(tv)
                level[form][1].append(top1)
            tok, prob = ref.sample(fp32.lm.ops, la)
            ref.commit(tok, prob)
            cmp_.commit(tok, prob)   # the same tokens and scores: both requests mask the same frames next
    return out


def summary(parts: list[tuple[list, list]]) -> dict:
    tv = torch.cat([t for p in parts for t in p[0]])
    top1 = torch.cat([t for p in parts for t in p[1]])
    return {"guided_tv_mean": float(tv.mean()), "guided_tv_max": float(tv.max()),
            "guided_top1": float(top1.float().mean()), "frames": int(tv.numel())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine-model", required=True, help="a converted MAGNeT engine model directory")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "int8", "float32"],
                   help="the dtype set against fp32 (float32: fp32 against itself, a check of this script)")
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many of the {len(PROMPTS)} prompts")
    p.add_argument("--frames", type=int, default=250, help="frames per generation (50 a second)")
    p.add_argument("--steps", default="20,10,10,10", help="decoding steps per level")
    p.add_argument("--json", help="write the figures here too")
    a = p.parse_args(argv)
    from stemgen.bench import cpu_label
    from stemgen.engine import Engine
    steps = tuple(int(s) for s in a.steps.split(","))
    fp32 = Engine.from_pretrained(a.engine_model, device="cpu", dtype="float32", load_codec_weights=False)
    other = Engine.from_pretrained(a.engine_model, device="cpu", dtype=a.dtype, load_codec_weights=False)
    fp32.require_kind("magnet")
    levels: dict = {}
    for i, prompt in enumerate(PROMPTS[: a.prompts]):
        for level, forms in compare(fp32, other, prompt, a.frames, steps, seed=i).items():
            for form, part in forms.items():
                levels.setdefault(level, {}).setdefault(form, []).append(part)
    report = {"dtype": a.dtype, "model": a.engine_model, "cpu": cpu_label(a.dtype),
              "torch": torch.__version__, "prompts": a.prompts, "frames": a.frames, "steps": list(steps),
              "fold": other.lm.ops.names["fold_guidance"], "levels": {}}
    every = {form: [x for lv in levels.values() for x in lv[form]] for form in ("folded", "every row")}
    for name, forms in [*((str(k), v) for k, v in sorted(levels.items())), ("all", every)]:
        report["levels"][name] = {form: summary(parts) for form, parts in forms.items()}
    print(f"MAGNeT {a.dtype} against fp32, {a.prompts} prompts x {a.frames} frames, steps {list(steps)}; "
          f"CPU {report['cpu']}; fold op: {report['fold']}")
    for name, forms in report["levels"].items():
        print(f"level {name:>3}: " + "; ".join(
            f"{form}: guided TV mean {s['guided_tv_mean']:.4f} max {s['guided_tv_max']:.3f}, top-1 "
            f"{100 * s['guided_top1']:.1f}%" for form, s in forms.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
