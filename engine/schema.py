"""One validation layer for untrusted configuration documents (config.json, checkpoint configs,
codec configs): every field's JSON type and range is checked here, before any code uses it, so a
hostile or broken file ends in one ``ModelFormatError`` line and never in a traceback, a huge
allocation or a division by zero.

A spec maps a field name to a ``Field``; ``check(doc, spec, where)`` returns the validated dict.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelFormatError

MAX_CONFIG_BYTES = 1 << 20     # a config.json is a few KB; larger is not a config


@dataclass(frozen=True)
class Field:
    kind: str                  # int | float | bool | str | ints | strs | name | dict | any
    lo: float | None = None
    hi: float | None = None
    required: bool = True
    nullable: bool = False
    max_len: int = 4096        # lists and strings
    choices: tuple = ()


# Sizes: generous for real models (the paper's LM is d 1024 x 20 layers, MusicGen's codec 64 filters),
# small enough that a config can never ask for more memory than a machine has.
LM_SPEC = {
    "d_model": Field("int", 2, 16384), "n_heads": Field("int", 1, 256), "n_layers": Field("int", 0, 256),
    "n_q": Field("int", 1, 64), "codebook_size": Field("int", 2, 1 << 16), "n_channels": Field("int", 1, 16),
    "cond_sizes": Field("ints", 1, 1 << 20, max_len=16), "ffn_hidden": Field("int", 1, 1 << 16),
    "rope_theta": Field("float", 1.0, 1e9, required=False), "norm_eps": Field("float", 0.0, 1.0, required=False),
}
CODEC_SPEC = {
    "sample_rate": Field("int", 1000, 384000), "channels": Field("int", 1, 8), "dimension": Field("int", 1, 4096),
    "n_filters": Field("int", 1, 1024), "ratios": Field("ints", 1, 64, max_len=8),
    "n_residual_layers": Field("int", 0, 8), "kernel_size": Field("int", 1, 64),
    "last_kernel_size": Field("int", 1, 64), "residual_kernel_size": Field("int", 1, 64),
    "dilation_base": Field("int", 1, 8), "compress": Field("int", 1, 64), "lstm_layers": Field("int", 0, 8),
    "causal": Field("bool"), "pad_mode": Field("str", choices=("constant", "reflect", "replicate")),
    "true_skip": Field("bool"), "trim_right_ratio": Field("float", 0.0, 1.0), "n_q": Field("int", 1, 64),
    "bins": Field("int", 2, 1 << 16),
}
SAMPLING_SPEC = {
    "steps": Field("ints", 1, 100000, max_len=64, required=False),
    "guidance": Field("str", choices=("multi", "single", "none", "magnet"), required=False),
    "cfg_context": Field("float", -1e3, 1e3, required=False), "cfg_instrument": Field("float", -1e3, 1e3, required=False),
    "cfg_scale": Field("float", -1e3, 1e3, required=False), "temperature": Field("float", 0.0, 1e3, required=False),
    "top_k": Field("int", 0, 1 << 16, required=False), "top_p": Field("float", 0.0, 1.0, required=False),
    "w_confidence": Field("float", -1e3, 1e3, required=False), "w_causal": Field("float", -1e3, 1e3, required=False),
    "w_random": Field("float", -1e3, 1e3, required=False), "seed": Field("int", 0, (1 << 63) - 1, required=False),
    "max_cfg_coef": Field("float", -1e3, 1e3, required=False), "min_cfg_coef": Field("float", -1e3, 1e3, required=False),
    "span_arrangement": Field("str", choices=("nonoverlap", "stride1"), required=False),
}
MODEL_SPEC = {
    "format": Field("str"), "format_version": Field("int", 0, 1 << 20), "lm": Field("dict"),
    "codec": Field("dict", required=False, nullable=True), "instruments": Field("strs", max_len=1 << 20, required=False),
    "sampling": Field("dict", required=False, nullable=True),
    "dtype": Field("str", choices=("float32", "bfloat16", "float16"), required=False),
    "weights": Field("dict", required=False, nullable=True), "untrained": Field("bool", required=False),
    "window": Field("int", 8, 1 << 20, required=False, nullable=True),
}
# a stemgen.train checkpoint's "config" (train.config.StemGenConfig), read by `stemgen convert`
TRAIN_SPEC = {
    "d_model": LM_SPEC["d_model"], "n_heads": LM_SPEC["n_heads"], "n_layers": LM_SPEC["n_layers"],
    "n_q": LM_SPEC["n_q"], "codebook_size": LM_SPEC["codebook_size"], "n_channels": LM_SPEC["n_channels"],
    "instruments": Field("strs", max_len=1 << 20), "extra_cond_sizes": Field("ints", 1, 1 << 20, max_len=15, required=False),
    "ffn_hidden": Field("int", 1, 1 << 16, required=False, nullable=True),
    "ffn_multiple_of": Field("int", 1, 1 << 16, required=False), "rope_theta": LM_SPEC["rope_theta"],
    "norm_eps": LM_SPEC["norm_eps"], "cond_dropout": Field("float", 0.0, 1.0, required=False),
}
WEIGHTS_SPEC = {"lm": Field("name"), "codec": Field("name", required=False, nullable=True),
                "text_encoder": Field("name", required=False, nullable=True)}   # a folder (MAGNeT's T5)
# an audiocraft MAGNeT LM (engine.config.MagnetConfig); sizes as LM_SPEC
MAGNET_SPEC = {
    "d_model": LM_SPEC["d_model"], "n_heads": LM_SPEC["n_heads"], "n_layers": LM_SPEC["n_layers"],
    "n_q": LM_SPEC["n_q"], "codebook_size": LM_SPEC["codebook_size"], "ffn_hidden": LM_SPEC["ffn_hidden"],
    "text_dim": Field("int", 1, 16384), "band": Field("int", 0, 1 << 20, required=False),
    "norm_eps": LM_SPEC["norm_eps"], "max_period": Field("float", 1.0, 1e9, required=False),
    "segment_frames": Field("int", 1, 1 << 20, required=False), "span_len": Field("int", 1, 1024, required=False),
    "arch": Field("str", choices=("magnet",)),
}

# a MAGNeT model's T5 text encoder config (transformers' T5Config), up to the largest T5 (t5-11b: 24
# layers, d_model 1024, d_ff 65536, 128 heads, vocab 32128) and beyond
T5_SPEC = {
    "num_layers": Field("int", 1, 96), "d_model": Field("int", 1, 16384), "d_ff": Field("int", 1, 131072),
    "num_heads": Field("int", 1, 256), "d_kv": Field("int", 1, 1024), "vocab_size": Field("int", 1, 1 << 20),
    "relative_attention_num_buckets": Field("int", 1, 4096),
}

# `stemgen train` options (train.trainer.TrainConfig): checked before anything is allocated, so an
# option can ask for no more than a config.json could (the model's sizes go through TRAIN_SPEC)
TRAIN_OPTIONS = {
    "frames": Field("int", 8, 1 << 20), "batch_size": Field("int", 1, 1 << 16), "steps": Field("int", 0, 1 << 40),
    "lr": Field("float", 1e-12, 10.0), "warmup": Field("int", 0, 1 << 40), "decay_every": Field("int", 1, 1 << 40),
    "decay_rate": Field("float", 1e-9, 1.0), "weight_decay": Field("float", 0.0, 10.0),
    "clip": Field("float", 1e-9, 1e9), "val_songs": Field("int", 1, 1 << 20), "val_every": Field("int", 1, 1 << 40),
    "val_batches": Field("int", 1, 1 << 16), "ckpt_every": Field("int", 1, 1 << 40),
    "seed": Field("int", 0, (1 << 32) - 1), "autocast": Field("str", choices=("auto", "bf16", "off")),
    "blank_prob": Field("float", 0.0, 1.0), "full_context_prob": Field("float", 0.0, 1.0), "preset": Field("str", max_len=64),
}
# `stemgen train-codec` options (train.codec.CodecTrainConfig); the codec's sizes go through CODEC_SPEC
CODEC_TRAIN_OPTIONS = {
    "batch_size": Field("int", 1, 1 << 16), "steps": Field("int", 0, 1 << 40), "lr": Field("float", 1e-12, 10.0),
    "warmup": Field("int", 0, 1 << 40), "l1_weight": Field("float", 0.0, 1e6), "commit_weight": Field("float", 0.0, 1e6),
    "bass_weight": Field("float", 0.0, 1e6), "chroma_weight": Field("float", 0.0, 1e6),
    "seed": Field("int", 0, (1 << 32) - 1), "songs": Field("int", 0, 1 << 30),
    "segment_s": Field("float", 0.01, 60.0), "fft_sizes": Field("ints", 16, 1 << 16, max_len=16),
    "bass_sr": Field("int", 100, 384000),
}


def check_options(values: dict, spec: dict[str, Field]) -> None:
    """Command-line options (``values`` by field name) against ``spec``; an error names the option
    as typed (``--batch-size: 0 is out of range [1, 65536]``)."""
    for name, f in spec.items():
        if name in values and not (values[name] is None and f.nullable):
            _check_value(values[name], f, "--" + name.replace("_", "-"))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pieces(x, depth: int = 0):
    """JSON text of ``x`` piece by piece, lazily: a document of shared references (a YAML alias bomb:
    966 bytes that expand to 10^10 items) is never built whole, only as far as it is read."""
    if depth > 16:
        yield "..."
    elif isinstance(x, dict):
        yield "{"
        for i, (k, v) in enumerate(x.items()):
            yield from ((", " if i else ""), json.dumps(k[:80]) if isinstance(k, str) else _short_repr(k), ": ")
            yield from _pieces(v, depth + 1)
        yield "}"
    elif isinstance(x, (list, tuple)):
        yield "["
        for i, v in enumerate(x):
            yield ", " if i else ""
            yield from _pieces(v, depth + 1)
        yield "]"
    elif isinstance(x, str):
        yield json.dumps(x[:80])
    elif x is None or isinstance(x, (bool, float)) or (isinstance(x, int) and abs(x) < 10 ** 80):
        yield json.dumps(x)
    else:   # YAML tags give bytes, dates, sets...; huge integers
        yield _short_repr(x)


def _short_repr(x) -> str:
    import reprlib
    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother, r.maxlong = 2, 80, 80, 80
    try:
        return r.repr(x)
    except Exception:  # noqa: BLE001 - a value whose repr fails is still named by its type
        return f"<{type(x).__name__}>"


def _show(x, limit: int = 40) -> str:
    """A value from an untrusted document for an error line: JSON where it is JSON, else a short
    repr; at most ``limit`` characters, control characters escaped, built only as far as shown."""
    text = ""
    for piece in _pieces(x):
        text += piece
        if len(text) > limit:
            break
    return text[:limit]


def _bound(b) -> str:
    """A range bound as people write it: 1048576, not 1.04858e+06; 1e-12 stays short."""
    return str(int(b)) if isinstance(b, int) or float(b).is_integer() and abs(b) < 1e15 else f"{b:g}"


def _check_value(v, f: Field, where: str):
    def bad(what: str):
        raise ModelFormatError(f"{where}: {what}")

    def number(x, integral: bool):
        if integral and not _is_int(x):
            bad(f"must be an integer, got {_show(x)}")
        if not integral and not (_is_int(x) or isinstance(x, float)):
            bad(f"must be a number, got {_show(x)}")
        if isinstance(x, float) and not math.isfinite(x):
            bad(f"must be finite, got {x}")
        if f.lo is not None and x < f.lo or f.hi is not None and x > f.hi:
            bad(f"{_show(x, 60)} is out of range [{_bound(f.lo)}, {_bound(f.hi)}]")
        return x

    if f.kind == "int":
        return number(v, True)
    if f.kind == "float":
        return float(number(v, False))
    if f.kind == "bool":
        if not isinstance(v, bool):
            bad(f"must be true or false, got {_show(v)}")
        return v
    if f.kind in ("str", "name"):
        if not isinstance(v, str) or not v or len(v) > f.max_len:
            bad(f"must be a non-empty string (at most {f.max_len} characters)")
        if f.choices and v not in f.choices:
            bad(f"{_show(v)} is not one of {', '.join(f.choices)}")
        if f.kind == "name" and (v in (".", "..") or "/" in v or "\\" in v or "\0" in v or Path(v).is_absolute()):
            bad(f"{_show(v)} must be a plain file name inside the model directory (no folders, no '..')")
        return v
    if f.kind in ("ints", "strs"):
        if isinstance(v, list) and not v and not f.required:
            return []
        if not isinstance(v, list) or not v or len(v) > f.max_len:
            bad(f"must be a non-empty list of at most {f.max_len} items")
        item = Field("int" if f.kind == "ints" else "str", f.lo, f.hi, max_len=256)
        return [_check_value(x, item, f"{where}[{i}]") for i, x in enumerate(v)]
    if f.kind == "dict":
        if not isinstance(v, dict):
            bad(f"must be an object, got {type(v).__name__}")
        return v
    return v


def check(doc, spec: dict[str, Field], where: str, allow_unknown: bool = False) -> dict:
    """Validate ``doc`` (a parsed JSON object) against ``spec``; returns a new dict of the known fields."""
    if not isinstance(doc, dict):
        raise ModelFormatError(f"{where}: must be an object, got {type(doc).__name__}")
    if not allow_unknown:
        unknown = sorted(str(k) for k in doc if k not in spec)
        if unknown:
            raise ModelFormatError(f"{where}: unknown field(s) {', '.join(unknown)[:200]}")
    out = {}
    for name, f in spec.items():
        if name not in doc:
            if f.required:
                raise ModelFormatError(f"{where}: missing field {name!r}")
            continue
        v = doc[name]
        if v is None:
            if not f.nullable:
                raise ModelFormatError(f"{where}.{name}: must not be null")
            out[name] = None
            continue
        out[name] = _check_value(v, f, f"{where}.{name}")
    return out


def load_json(path: str | Path, limit: int = MAX_CONFIG_BYTES):
    """Parse a JSON file of bounded size; any failure is one ModelFormatError line."""
    from .fileutil import read_bounded
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limit:
            raise ModelFormatError(f"{path}: {size} bytes is too large for a config file (at most {limit})")
        data = read_bounded(path, limit)   # a device or pipe reports size 0
    except ModelFormatError:
        raise
    except ValueError:
        raise ModelFormatError(f"{path}: too large for a config file (at most {limit} bytes)") from None
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        return json.loads(data)
    except RecursionError:
        raise ModelFormatError(f"{path}: nested too deeply to be a config file") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path}: not valid JSON ({str(e)[:120]})") from None
