"""The checkpoint formats `stemgen convert` reads: one row per format. Detection, the
--lm-format / --codec-format choices, the CLI's help and the error messages all come from this
table; adding a format is a reader and a detector in lm.py or codec.py and one row here. Readers
are named by module path and imported when used (this module stays light for the CLI's help)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..engine.errors import ModelFormatError
from .pickles import PickleFile, pickle_file


@dataclass(frozen=True)
class Format:
    name: str        # the --lm-format / --codec-format value
    kind: str        # "lm" or "codec"
    what: str        # what the user passes, for help and errors
    detect: str      # "module:function" (path, load) -> bool; load(): the unpickled file, or None if not one
    read: str        # "module:function" (path, load) -> (config, state dict); load(): the unpickled file

    def fn(self, which: str) -> Callable:
        module, name = getattr(self, which).split(":")
        return getattr(importlib.import_module(module, __package__), name)


FORMATS = [
    Format("train", "lm", "a `stemgen train` checkpoint, model.pt", ".lm:is_train", ".lm:read_train"),
    Format("magnet", "lm", "an audiocraft MAGNeT state_dict.bin (with --text-encoder T5_FOLDER)", ".magnet:is_magnet",
           ".magnet:read_magnet"),
    Format("audiocraft", "codec", "an audiocraft compression_state_dict.bin", ".codec:is_audiocraft",
           ".codec:read_audiocraft"),
    Format("engine", "codec", "an engine model directory (its codec reused)", ".codec:is_engine", ".codec:read_engine"),
    Format("hf", "codec", "a HF transformers Encodec folder, config.json + model.safetensors", ".codec:is_hf",
           ".codec:read_hf"),
    Format("encodec", "codec", "an `encodec` package .th state dict", ".codec:is_encodec", ".codec:read_encodec"),
]


def formats(kind: str) -> list[Format]:
    return [f for f in FORMATS if f.kind == kind]


def describe(kind: str) -> str:
    """'name = what; ...' for help texts and errors."""
    return "; ".join(f"{f.name} = {f.what}" for f in formats(kind))


def get(kind: str, name: str) -> Format:
    for f in formats(kind):
        if f.name == name:
            return f
    raise ModelFormatError(f"unknown --{kind}-format {name!r}; choose one of "
                           f"{', '.join(f.name for f in formats(kind))}")


def detect(kind: str, src: str | Path | PickleFile) -> Format:
    """The format of ``src`` from its content (each detector may raise a more specific hint)."""
    file = pickle_file(src)
    path, load = file.path, file.load_if_torch
    if not path.exists():
        raise ModelFormatError(f"{path}: no such file or folder")
    for f in formats(kind):
        if f.fn("detect")(path, load):
            return f
    found = "a folder" if path.is_dir() else "not a PyTorch checkpoint" if load() is None else \
        f"top-level {list(load())[:5] if isinstance(load(), dict) else type(load()).__name__}"
    raise ModelFormatError(f"{path}: unknown {'LM checkpoint' if kind == 'lm' else kind} format ({found}); "
                           f"supported: {describe(kind)}")


def read(kind: str, src: str | Path | PickleFile, name: str | None = None):
    """-> (source config, state dict) of ``src`` in format ``name`` (detected if None); the file is
    unpickled once for detection and reading together."""
    file = pickle_file(src)
    f = get(kind, name) if name else detect(kind, file)
    return f.fn("read")(file.path, file.load)
