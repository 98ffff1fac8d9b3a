"""The architectures the engine knows (one module each: engine.model for StemGen, engine.magnet
for MAGNeT) and building an LM of the config's one. The only module that imports every
architecture; the runner, scheduler and CUDA graphs take what it builds and never ask which runs."""
from __future__ import annotations

from pathlib import Path

import torch

from .backend import select_ops
from .config import LMConfig, read_weights
from .magnet import MagnetLM, magnet_shapes
from .model import PackedLM, StemGenEngineLM, pack_trunk, quantize_trunk, resolve_dtype, stemgen_shapes

ARCHITECTURES = {"stemgen": (StemGenEngineLM, stemgen_shapes), "magnet": (MagnetLM, magnet_shapes)}
# the ops each architecture's step runs (`stemgen info` shows a model's own)
ARCH_OPS = {name: cls.OPS for name, (cls, _) in ARCHITECTURES.items()}


def architecture(cfg):
    """(module class, expected_shapes function) of the config's architecture."""
    return ARCHITECTURES[cfg.arch]


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Every tensor of the engine's LM weight file, by name (per architecture)."""
    return architecture(cfg)[1](cfg)


def load_lm(path: str | Path, cfg: LMConfig, device="cpu", dtype: str | torch.dtype = "float32") -> PackedLM:
    """Check every tensor of the safetensors file against the config (names, shapes, float dtype)
    before use, then build the LM on the meta device and assign the (cast) weights."""
    state = read_weights(path, expected_shapes(cfg), "the LM config in config.json", "tensor",
                         "re-run `stemgen convert`")
    return lm_from_state(cfg, state, device, dtype)


def lm_from_state(cfg: LMConfig, state: dict[str, torch.Tensor], device="cpu",
                  dtype: str | torch.dtype = "float32") -> PackedLM:
    """Build the LM on the meta device and assign already-validated engine tensors to it."""
    dtype = resolve_dtype(dtype)
    int8 = dtype == torch.int8
    if int8 and torch.device(device).type != "cpu":
        raise ValueError("--dtype int8 is the CPU's path; on a GPU use bfloat16 (the default there)")
    compute = torch.float32 if int8 else dtype
    with torch.device("meta"):
        model = architecture(cfg)[0](cfg)
    state = {k: v.to(device=device, dtype=compute) for k, v in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    model.rebuild_buffers(device)  # buffers were built on meta above
    model.ops = select_ops(torch.device(device), dtype)   # int8: fp32 ops, but not bit-bound to fp32's
    if int8:
        quantize_trunk(model)
    else:
        pack_trunk(model)   # fp32 on the CPU: weights in the GEMM op's own layout
    return model.eval().requires_grad_(False)
