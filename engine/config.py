"""Engine model-directory format: ``config.json`` + safetensors weights.

config.json:
  {"format": "stemgen-engine", "format_version": 1,
   "lm": {LMConfig fields}, "codec": {...} | null, "instruments": [names],
   "sampling": {SamplingConfig defaults}, "dtype": "float32",
   "weights": {"lm": "lm.safetensors", "codec": "codec.safetensors" | null}}
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

FORMAT_NAME = "stemgen-engine"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
LM_WEIGHTS = "lm.safetensors"
CODEC_WEIGHTS = "codec.safetensors"


from .errors import ModelFormatError, RequestError  # noqa: E402,F401  (re-exported: the historical home)
from .tensors import check_finite, check_shapes, read_weights  # noqa: E402,F401  (re-exported)


@dataclass(frozen=True)
class LMConfig:
    d_model: int
    n_heads: int
    n_layers: int
    n_q: int
    codebook_size: int
    n_channels: int
    cond_sizes: tuple[int, ...]
    ffn_hidden: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        object.__setattr__(self, "cond_sizes", tuple(int(n) for n in self.cond_sizes))
        checks = [
            (self.d_model % self.n_heads == 0, "d_model must be divisible by n_heads"),
            ((self.d_model // self.n_heads) % 2 == 0, "head dim d_model/n_heads must be even (RoPE)"),
            (self.d_model % self.n_channels == 0, "d_model must be divisible by n_channels"),
            (self.n_channels >= 1 and self.n_q >= 1 and self.n_layers >= 0, "sizes must be positive"),
            (len(self.cond_sizes) >= 1 and min(self.cond_sizes) >= 1, "cond_sizes needs >= 1 source of >= 1 class"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ModelFormatError(f"lm config: {msg} (got {self})")

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    @property
    def null_id(self) -> int:
        return self.codebook_size + 1

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def channel_dim(self) -> int:
        return self.d_model // self.n_channels

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["cond_sizes"] = list(self.cond_sizes)
        return d

    arch = "stemgen"

    @classmethod
    def from_dict(cls, d: dict) -> "LMConfig":
        from .schema import LM_SPEC, check
        return cls(**check(d, LM_SPEC, "lm config"))


@dataclass(frozen=True)
class MagnetConfig:
    """An audiocraft MAGNeT LM (SPEC 9): one token stream of n_q levels, text conditioning by
    cross-attention to a T5 memory projected to d_model, LayerNorm with bias, GELU feed-forward,
    sinusoidal positions, self-attention restricted to +-``band`` frames at levels >= 1."""
    d_model: int
    n_heads: int
    n_layers: int
    n_q: int
    codebook_size: int
    ffn_hidden: int
    text_dim: int                    # the T5 encoder's width (output_proj: text_dim -> d_model)
    band: int = 5                    # subcodes_context; 0 would be a level's own frame only
    norm_eps: float = 1e-5
    max_period: float = 10000.0      # sinusoidal positions
    segment_frames: int = 500        # the model's fixed length (segment_duration x frame rate)
    span_len: int = 3
    arch: str = "magnet"

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ModelFormatError(f"lm config: d_model must be divisible by n_heads (got {self})")
        if self.arch != "magnet":
            raise ModelFormatError(f"lm config: arch {self.arch!r} is not 'magnet'")

    n_channels = 1                   # class attributes, not fields: the target stream only, no categories
    cond_sizes = ()

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MagnetConfig":
        from .schema import MAGNET_SPEC, check
        return cls(**check(d, MAGNET_SPEC, "lm config"))


MAGNET_KNOBS = ("steps", "temperature", "top_k", "top_p", "seed", "max_cfg_coef", "min_cfg_coef", "span_arrangement")


def magnet_sampling_defaults(steps=(20, 10, 10, 10), temperature: float = 3.0, top_k: int = 0,
                             top_p: float = 0.9, **rest) -> SamplingConfig:
    """MAGNeT's generation defaults: audiocraft's MAGNeT.set_generation_params (top-p 0.9, temperature
    3.0 annealed, CFG 10 -> 1, steps 20,10,10,10, nonoverlap spans)."""
    return SamplingConfig(steps=tuple(steps), guidance="magnet", temperature=temperature, top_k=top_k, top_p=top_p,
                          **rest)


def is_model_dir(path: Path) -> bool:
    """Does ``path`` look like an engine model folder (its config.json names the format in its first
    4 KB)? A cheap check that reads no more than that; ModelConfig.load validates."""
    cfg = Path(path) / CONFIG_FILE
    if not (Path(path).is_dir() and cfg.is_file()):
        return False
    with open(cfg, "rb") as f:
        return f'"{FORMAT_NAME}"'.encode() in f.read(4096)


def lm_config_from_dict(d) -> "LMConfig | MagnetConfig":
    """The LM config of its architecture (``arch``; absent: a StemGen LM)."""
    arch = d.get("arch", "stemgen") if isinstance(d, dict) else "stemgen"
    if arch == "magnet":
        return MagnetConfig.from_dict(d)
    if arch != "stemgen":
        raise ModelFormatError(f"lm config: unknown arch {str(arch)[:40]!r}; this engine runs 'stemgen' and 'magnet'")
    return LMConfig.from_dict({k: v for k, v in d.items() if k != "arch"})


STEMGEN_GUIDANCE = ("multi", "single", "none")   # guidance_rows' forms ("magnet" is MAGNeT's own)


def check_guidance(guidance: str, arch: str) -> None:
    """The one check that a guidance form is the model's: StemGen's three, or MAGNeT's."""
    if arch == "magnet" and guidance != "magnet":
        raise RequestError(f"guidance {guidance!r} is StemGen's; a MAGNeT model takes its own (guidance magnet)")
    if arch != "magnet" and guidance not in STEMGEN_GUIDANCE:
        raise RequestError(f"guidance {guidance!r} is MAGNeT's; a StemGen model takes "
                           f"{', '.join(STEMGEN_GUIDANCE)}")


@dataclass
class SamplingConfig:
    """Sampler defaults (SPEC section 4; the paper's setting)."""
    steps: tuple[int, ...] = (128, 64, 32, 32)
    guidance: str = "multi"          # "multi" (3 rows) | "single" (2 rows) | "none" (1 row) | "magnet" (MAGNeT's)
    cfg_context: float = 3.0         # lambda_a (multi-source)
    cfg_instrument: float = 3.0      # lambda_i (multi-source)
    cfg_scale: float = 3.0           # lambda (single-source)
    temperature: float = 1.0
    top_k: int = 0                   # 0: off
    top_p: float = 1.0               # 1.0: off
    w_confidence: float = 0.1        # causal-bias ranking (paper Eq. 1)
    w_causal: float = 0.1
    w_random: float = 1.0
    seed: int = 0
    # MAGNeT's decoding (engine.magnet_sampling; unused by StemGen models): CFG coefficient annealed
    # from max to min with the mask ratio, spans of span_len frames re-masked as chunks or by stride
    max_cfg_coef: float = 10.0
    min_cfg_coef: float = 1.0
    span_arrangement: str = "nonoverlap"    # "nonoverlap" (the paper's) | "stride1"

    def __post_init__(self):
        from .schema import SAMPLING_SPEC, check
        d = dataclasses.asdict(self)
        d["steps"] = list(self.steps) if isinstance(self.steps, (list, tuple)) else self.steps
        try:
            check(d, SAMPLING_SPEC, "sampling")
        except ModelFormatError as e:
            raise RequestError(str(e).replace("sampling.", "sampling option ", 1)) from None
        self.steps = tuple(int(s) for s in self.steps)
        if self.span_arrangement not in ("nonoverlap", "stride1"):
            raise ValueError(f"span_arrangement must be 'nonoverlap' or 'stride1', got {self.span_arrangement!r}")
        if self.guidance not in ("multi", "single", "none", "magnet"):
            raise ValueError(f"guidance must be 'multi', 'single' or 'none', got {self.guidance!r}")
        if not self.steps or min(self.steps) < 1:
            raise ValueError(f"steps must be >= 1 per level, got {self.steps}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 <= self.top_p <= 1.0 if self.guidance == "magnet" else 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in {'[0' if self.guidance == 'magnet' else '(0'}, 1] "
                             f"(MAGNeT: 0 = off; StemGen: 1 = off), got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    def guidance_weights(self) -> list[float]:
        if self.guidance == "magnet":
            return [1.0, 0.0]   # rows: conditioned, unconditioned (the annealed coefficient is per step)
        if self.guidance == "multi":
            return [self.cfg_context, self.cfg_instrument, 1.0 - self.cfg_context - self.cfg_instrument]
        if self.guidance == "single":
            return [self.cfg_scale, 1.0 - self.cfg_scale]
        return [1.0]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["steps"] = list(self.steps)
        return d

    def knobs(self) -> dict:
        """The settings this decoding uses (MAGNeT's or StemGen's), for display."""
        d = self.to_dict()
        names = MAGNET_KNOBS if self.guidance == "magnet" else [k for k in d if k not in MAGNET_KNOBS[-3:]]
        return {k: d[k] for k in names}

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingConfig":
        from .schema import SAMPLING_SPEC, check
        return cls(**check(d, SAMPLING_SPEC, "sampling", allow_unknown=True))


def parse_sampling(text: str, what: str = "--sampling") -> dict:
    """'cfg_context=1.5,steps=128/64/32/32' -> {"cfg_context": 1.5, "steps": (128, 64, 32, 32)}, each value
    typed by its SamplingConfig field; an unknown key or a bad value is a ValueError naming ``what``."""
    kinds = {f.name: type(f.default) for f in dataclasses.fields(SamplingConfig)}
    values = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, eq, value = (x.strip() for x in item.partition("="))
        if key not in kinds or not eq:
            raise ValueError(f"{what}: {item[:40]!r} is not KEY=VALUE with KEY one of {', '.join(kinds)}")
        kind = kinds[key]
        try:
            values[key] = (tuple(int(v) for v in value.split("/")) if kind is tuple
                           else value if kind is str else kind(value))
        except ValueError:
            raise ValueError(f"{what}: {key}={value[:40]!r} is not a{'n integer' if kind is int else ' number'}"
                             f"{' list (a/b/c)' if kind is tuple else ''}") from None
    return values


@dataclass
class ModelConfig:
    lm: LMConfig
    instruments: list[str]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    codec: dict | None = None
    dtype: str = "float32"
    weights: dict = field(default_factory=lambda: {"lm": LM_WEIGHTS, "codec": None})
    untrained: bool = False  # random weights (the demo model): outputs are noise
    window: int | None = None  # training window in frames: longer contexts are generated window by window

    def __post_init__(self):
        try:
            check_guidance(self.sampling.guidance, self.lm.arch)
        except RequestError as e:
            raise ModelFormatError(f"config: sampling: {e}") from None
        if self.lm.arch == "magnet":
            if self.instruments:
                raise ModelFormatError("config: a MAGNeT model is conditioned on text; it has no instruments")
            if not self.weights.get("text_encoder"):
                raise ModelFormatError("config: a MAGNeT model needs weights.text_encoder (its T5 folder); "
                                       "re-run `stemgen convert --text-encoder T5_FOLDER`")
            return
        if len(self.instruments) != self.lm.cond_sizes[0]:
            raise ModelFormatError(
                f"config: {len(self.instruments)} instrument names but the instrument table has "
                f"{self.lm.cond_sizes[0]} classes (lm.cond_sizes[0])")

    def to_dict(self) -> dict:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "lm": self.lm.to_dict(),
                "codec": self.codec, "instruments": list(self.instruments),
                "sampling": self.sampling.to_dict(), "dtype": self.dtype, "weights": dict(self.weights),
                "untrained": self.untrained, "window": self.window}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        from .schema import MODEL_SPEC, WEIGHTS_SPEC, check
        d = check(d, MODEL_SPEC, "config.json", allow_unknown=True)
        if d.get("format") != FORMAT_NAME:
            raise ModelFormatError(f"config.json: format is {d.get('format')!r}, expected {FORMAT_NAME!r}")
        if d.get("format_version") != FORMAT_VERSION:
            raise ModelFormatError(f"config.json: format_version {d.get('format_version')!r} is not "
                                   f"supported (this engine reads {FORMAT_VERSION}); re-convert the model")
        for key in ("lm", "instruments"):
            if key not in d:
                raise ModelFormatError(f"config.json: missing field {key!r}")
        lm = lm_config_from_dict(d["lm"])
        raw = d.get("sampling") or {}
        if isinstance(lm, MagnetConfig) and isinstance(raw, dict) and "guidance" not in raw:
            raw = {**magnet_sampling_defaults().to_dict(), **raw}   # a MAGNeT model's own defaults beneath
        try:
            sampling = SamplingConfig.from_dict(raw)
        except (TypeError, ValueError) as e:
            raise ModelFormatError(f"config.json: sampling: {e}") from None
        weights = check(d.get("weights") or {"lm": LM_WEIGHTS}, WEIGHTS_SPEC, "config.json weights")
        weights.setdefault("codec", None)
        codec = d.get("codec")
        if codec is not None:
            from .codec import CodecConfig
            codec = CodecConfig.from_dict(codec).to_dict()
            if weights["codec"] is None:
                raise ModelFormatError("config.json: a codec config but no weights.codec file name")
        return cls(lm=lm, instruments=list(d["instruments"]), sampling=sampling,
                   codec=codec, dtype=d.get("dtype", "float32"), weights=weights,
                   untrained=bool(d.get("untrained", False)), window=d.get("window"))

    def file(self, model_dir: str | Path, part: str) -> Path:
        """The path of weights ``part`` (lm, codec, text_encoder) in ``model_dir``, links resolved; one
        that leads outside the model directory (a symlink to anywhere, e.g. /etc/passwd) is refused.
        For the text encoder folder every file in it is checked the same way."""
        name = self.weights.get(part)
        if not name:
            raise ModelFormatError(f"{model_dir}: config.json names no {part} weights")
        return inside_model_dir(model_dir, name, recursive=part == "text_encoder")

    @classmethod
    def load(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / CONFIG_FILE
        if not Path(model_dir).is_dir():
            raise ModelFormatError(f"{model_dir}: not a directory; pass a model directory made by `stemgen convert`")
        if not path.is_file():
            raise ModelFormatError(f"{path}: missing; a model directory made by `stemgen convert` has one")
        from .schema import load_json
        return cls.from_dict(load_json(path))


MAX_FOLDER_FILES = 10000   # a text encoder folder holds a dozen files


def inside_model_dir(model_dir: str | Path, name: str, recursive: bool = False) -> Path:
    """``model_dir / name`` resolved (every symlink followed); refused, as one ModelFormatError line,
    when it leads outside the resolved model directory. ``recursive``: a folder whose every entry
    must stay inside too (transformers opens the files of a T5 folder by name)."""
    root = Path(model_dir).resolve()
    path = Path(model_dir) / name

    def check(p: Path) -> Path:
        try:
            target = p.resolve()
        except (OSError, RuntimeError) as e:    # RuntimeError: a symlink loop (Python < 3.13)
            raise ModelFormatError(f"{p}: cannot be resolved ({type(e).__name__})") from None
        if target != root and root not in target.parents:
            raise ModelFormatError(f"{p}: a link that leads outside the model directory {model_dir}; a model "
                                   "directory's files must be inside it (copy the file in)")
        return target

    target = check(path)
    if recursive and target.is_dir():
        for i, entry in enumerate(target.rglob("*")):
            if i >= MAX_FOLDER_FILES:
                raise ModelFormatError(f"{path}: more than {MAX_FOLDER_FILES} entries; not a text encoder folder")
            check(entry)
    return target
