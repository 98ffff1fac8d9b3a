"""Model configuration (SPEC section 3) as a JSON round-trippable dataclass, with named presets."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

# General MIDI instrument categories as used by Slakh2100 (SPEC section 3).
SLAKH_INSTRUMENTS = [
    "piano", "chromatic_percussion", "organ", "guitar", "bass", "strings", "ensemble", "brass",
    "reed", "pipe", "synth_lead", "synth_pad", "synth_effects", "ethnic", "percussive",
    "sound_effects", "drums",
]


@dataclass
class StemGenConfig:
    d_model: int = 1024
    n_heads: int = 16
    n_layers: int = 20
    n_q: int = 4                      # RVQ levels (Q)
    codebook_size: int = 2048
    n_channels: int = 2               # audio channels (context channels + 1 target), concatenated
    instruments: list[str] = field(default_factory=lambda: list(SLAKH_INSTRUMENTS))
    extra_cond_sizes: list[int] = field(default_factory=list)  # further categorical conditions
    ffn_hidden: int | None = None     # None: 8/3 * d_model rounded up to ffn_multiple_of
    ffn_multiple_of: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    cond_dropout: float = 0.2         # training only: per-source dropout for CFG (SPEC 5)

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head dim d_model/n_heads = {self.d_model // self.n_heads} must be even (RoPE)")
        if self.d_model % self.n_channels:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_channels ({self.n_channels})")
        if not self.instruments:
            raise ValueError("instruments must name at least one instrument")
        if self.ffn_hidden is None:
            m = self.ffn_multiple_of
            self.ffn_hidden = m * -(-(8 * self.d_model) // (3 * m))

    # special token ids of the level tables (SPEC 3)
    @property
    def mask_id(self) -> int:
        return self.codebook_size

    @property
    def null_id(self) -> int:
        return self.codebook_size + 1

    @property
    def cond_sizes(self) -> list[int]:
        """Classes per conditioning source; each table has one more (NULL) row."""
        return [len(self.instruments), *self.extra_cond_sizes]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StemGenConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, s: str) -> "StemGenConfig":
        return cls.from_dict(json.loads(s))


PRESETS: dict[str, dict] = {
    # the paper's model: about 250M parameters
    "paper": dict(),
    # CPU benchmark size (issue: scheduler bench)
    "small": dict(d_model=256, n_heads=4, n_layers=6),
    # unit-test size
    "tiny": dict(d_model=64, n_heads=4, n_layers=2, codebook_size=64, ffn_multiple_of=32),
}


def preset(name: str, **overrides) -> StemGenConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return StemGenConfig(**{**PRESETS[name], **overrides})
