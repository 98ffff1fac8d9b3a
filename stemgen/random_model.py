"""`--model random`: a small randomly initialised model of the real architecture (StemGen LM +
the 32 kHz MusicGen Encodec), built from a fixed seed and cached in the engine format. Its weights
are untrained: what it generates is noise. Tests and benchmarks use it (the real codec's shapes and
cost); for music use the trained demo model (`--model demo`, the default) or your own."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .engine.codec import Codec, CodecConfig, expected_codec_shapes
from .engine.config import CODEC_WEIGHTS, ModelConfig, ModelFormatError
from .engine.models import cache_root
from .train import StemGenLM, preset
from .weights_convert.lm import convert_train_state, engine_lm_config
from .weights_convert.writer import write_model_dir

RANDOM_VERSION = 1
RANDOM_SEED = 1234
RANDOM_LM = dict(d_model=256, n_heads=4, n_layers=4)  # the real token layout, a CPU-friendly size


def random_dir() -> Path:
    return cache_root() / f"random-v{RANDOM_VERSION}"


def random_codec_weights(cfg: CodecConfig, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = {}
    for name, shape in expected_codec_shapes(cfg).items():
        if name.startswith("quantizer."):
            continue
        if "lstm" in name:
            bound = 1 / math.sqrt(shape[-1] if len(shape) > 1 else shape[0] // 4)
            w[name] = (torch.rand(shape, generator=g) * 2 - 1) * bound
        elif name.endswith("bias"):
            w[name] = torch.zeros(shape)
        else:  # conv weights: unit-gain scale over the last two dims
            w[name] = torch.randn(shape, generator=g) / math.sqrt(shape[1] * shape[2])
    # codebooks on the scale of what the random encoder produces, smaller for finer levels
    probe = Codec(cfg, {**w, **{f"quantizer.{k}.embed": torch.zeros(cfg.bins, cfg.dimension)
                                for k in range(cfg.n_q)}})
    z = probe._run("encoder", torch.randn(1, cfg.channels, cfg.sample_rate, generator=g) * 0.1)
    scale = float(z.std())
    for k in range(cfg.n_q):
        w[f"quantizer.{k}.embed"] = torch.randn(cfg.bins, cfg.dimension, generator=g) * scale * 0.6 ** k
    return w


def ensure_random_model(log=print) -> Path:
    """Return the cached random model directory, building it first if needed."""
    out = random_dir()
    if (out / "config.json").is_file():
        return out
    log(f"building the random-weights model (seed {RANDOM_SEED}) in {out} ...")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(RANDOM_SEED)
    cfg = preset("paper", **RANDOM_LM)
    lm = StemGenLM(cfg)
    codec_cfg = CodecConfig()
    config = ModelConfig(lm=engine_lm_config(cfg), instruments=list(cfg.instruments), codec=codec_cfg.to_dict(),
                         weights={"lm": "lm.safetensors", "codec": CODEC_WEIGHTS}, untrained=True)
    weights = {"lm": convert_train_state(cfg, lm.state_dict()), "codec": random_codec_weights(codec_cfg, RANDOM_SEED)}
    try:
        write_model_dir(out, config, weights)
    except ModelFormatError:
        if not (out / "config.json").is_file():  # another process finished it first: fine
            raise
    return out
