"""Python API: ``Engine.from_pretrained(dir)`` then ``engine.generate_tokens(...)``."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .config import ModelConfig
from .model import StemGenEngineLM, load_lm, resolve_dtype
from .sampler import generate_tokens


def pick_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
    return device


def backends(device: torch.device) -> dict[str, str]:
    """What runs where (reported by `stemgen info`)."""
    return {
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "embedding-sum": "PyTorch reference (kernels.embedding.embed_sum_ref)",
        "attention": "torch scaled_dot_product_attention",
        "guidance+sampling": "PyTorch reference (kernels.sampling.guide_sample_rank_ref)",
        "torch": torch.__version__,
    }


class Engine:
    def __init__(self, config: ModelConfig, lm: StemGenEngineLM, model_dir: Path | None = None):
        self.config = config
        self.lm = lm
        self.model_dir = model_dir

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str | torch.device | None = "auto",
                        dtype: str | torch.dtype | None = None) -> "Engine":
        """Load an engine model directory. dtype defaults to bfloat16 on CUDA, float32 on the CPU."""
        model_dir = Path(model_dir)
        config = ModelConfig.load(model_dir)
        device = pick_device(device)
        dtype = resolve_dtype(dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        lm = load_lm(model_dir / config.weights["lm"], config.lm, device=device, dtype=dtype)
        return cls(config, lm, model_dir)

    @property
    def instruments(self) -> list[str]:
        return list(self.config.instruments)

    def instrument_id(self, instrument: str | int) -> int:
        names = self.config.instruments
        if isinstance(instrument, int):
            if not 0 <= instrument < len(names):
                raise ValueError(f"instrument id {instrument} out of range 0..{len(names) - 1}")
            return instrument
        if instrument not in names:
            raise ValueError(f"unknown instrument {instrument!r}; valid names: {', '.join(names)}")
        return names.index(instrument)

    def sampling(self, **overrides):
        """The model's default sampling settings with ``overrides`` (None values ignored)."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self.config.sampling)}
        if unknown:
            raise TypeError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self.config.sampling, **{k: v for k, v in overrides.items() if v is not None})

    def generate_tokens(self, context: torch.Tensor, instrument: str | int, target: torch.Tensor | None = None,
                        extra_conditions: list[int] | tuple[int, ...] = (), progress=None, **sampling):
        """context [C-1, Q, T] codes -> generated target codes [Q, T] (on the CPU)."""
        conditions = torch.tensor([self.instrument_id(instrument), *extra_conditions], dtype=torch.int64)
        out = generate_tokens(self.lm, torch.as_tensor(context), conditions, self.sampling(**sampling),
                              target=target, progress=progress)
        return out.cpu()
