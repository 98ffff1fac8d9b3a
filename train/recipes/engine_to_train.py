"""An engine model directory's StemGen LM as a `stemgen train` checkpoint (model.pt), so a shipped
model (e.g. engine/demo_model) can be trained further with `stemgen train --init-from`. The weights
are the engine's as stored (the demo: fp16, so the fp32 master weights of its run are rounded).

    python train/recipes/engine_to_train.py engine/demo_model OUT/model.pt --preset small --n-layers 4
"""
import argparse

import torch

from stemgen.engine.config import ModelConfig
from stemgen.engine.architectures import load_lm
from stemgen.train import StemGenLM, preset, save_checkpoint
from stemgen.weights_convert.lm import train_state_from_engine


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("out")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--n-layers", type=int)
    a = ap.parse_args()
    mc = ModelConfig.load(a.model_dir)
    lm = mc.lm
    overrides = {"instruments": list(mc.instruments), "codebook_size": lm.codebook_size}
    if a.n_layers is not None:
        overrides["n_layers"] = a.n_layers
    cfg = preset(a.preset, **overrides)
    engine = load_lm(f"{a.model_dir}/{mc.weights['lm']}", lm)
    if (cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.ffn_hidden) != (lm.d_model, lm.n_heads, lm.n_layers, lm.ffn_hidden):
        raise SystemExit(f"error: --preset {a.preset} gives d {cfg.d_model} x {cfg.n_layers} layers, ffn {cfg.ffn_hidden}; "
                         f"the model is d {lm.d_model} x {lm.n_layers}, ffn {lm.ffn_hidden}")
    model = StemGenLM(cfg)
    model.load_state_dict(train_state_from_engine(cfg, {k: v.float() for k, v in engine.state_dict().items()}))
    save_checkpoint(model.eval(), a.out)
    print(f"wrote {a.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    with torch.no_grad():
        main()
