"""A `stemgen train` LM checkpoint made deeper without changing what it computes: each new layer is
a copy of the layer before it with its two output projections (attention `wo`, feed-forward `w2`)
zeroed, so it adds nothing to the residual stream until training moves those weights.

    python train/recipes/deepen_lm.py RUN/model.pt OUT/model.pt --n-layers 8

The new layers are spread evenly (4 -> 8: old 0, new, old 1, new, ...). Train the result with
`stemgen train --init-from OUT/model.pt --n-layers 8 ...`.
"""
import argparse

import torch

from stemgen.train import StemGenConfig, StemGenLM, load_checkpoint, save_checkpoint
from stemgen.train.loop import TrainError, check_memory


def layer_plan(old: int, new: int) -> list[tuple[int, bool]]:
    """(source layer, zeroed) for each layer of the deeper model."""
    extra = [(new - old) // old + (j < (new - old) % old) for j in range(old)]
    return [p for j in range(old) for p in [(j, False)] + [(j, True)] * extra[j]]


def deepen(model: StemGenLM, n_layers: int) -> StemGenLM:
    old = model.cfg.n_layers
    if n_layers < old:
        raise SystemExit(f"error: --n-layers {n_layers} is below the model's {old} layers")
    src = model.state_dict()
    layer = sum(v.numel() for k, v in src.items() if k.startswith("layers.0."))
    params = sum(v.numel() for v in src.values()) + (n_layers - old) * layer
    try:   # the deeper model and the state it is built from, fp32, before anything is allocated
        check_memory(f"an LM of {n_layers} layers ({params / 1e6:.1f}M parameters)", 8 * params, "cpu", "--n-layers")
    except TrainError as e:
        raise SystemExit(f"error: {e}") from None
    cfg = StemGenConfig.from_dict({**model.cfg.to_dict(), "n_layers": n_layers})
    deep = StemGenLM(cfg)
    state = {k: v for k, v in src.items() if not k.startswith("layers.")}
    for i, (j, zeroed) in enumerate(layer_plan(old, n_layers)):
        for k, v in src.items():
            if k.startswith(f"layers.{j}."):
                name = k[len(f"layers.{j}."):]
                w = v.clone()
                if zeroed and name in ("attn.wo.weight", "ffn.w2.weight"):
                    w.zero_()
                state[f"layers.{i}.{name}"] = w
    deep.load_state_dict(state)
    return deep


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("out")
    ap.add_argument("--n-layers", type=int, required=True)
    a = ap.parse_args()
    model = load_checkpoint(a.checkpoint)
    deep = deepen(model, a.n_layers)
    save_checkpoint(deep.eval(), a.out)
    print(f"wrote {a.out}: {model.cfg.n_layers} -> {a.n_layers} layers, "
          f"{sum(p.numel() for p in deep.parameters()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    with torch.no_grad():
        main()
