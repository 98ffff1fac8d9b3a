"""Atomic writing of an engine model directory: everything goes to a temporary sibling
directory that is renamed into place only once complete, so a failure leaves nothing behind."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..engine.config import CONFIG_FILE, ModelConfig, ModelFormatError
from ..engine.fileutil import default_permissions


def write_model_dir(out: str | Path, config: ModelConfig, weights: dict[str, dict[str, torch.Tensor]],
                    overwrite: bool = False) -> Path:
    """weights: {"lm": state, "codec": state-or-missing}; file names come from config.weights."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ModelFormatError(f"{out}: already exists; choose another --out or pass --force to replace it")
    if not out.parent.is_dir():
        raise ModelFormatError(f"{out.parent}: output's parent folder does not exist; create it first")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for part, state in weights.items():
            fname = config.weights.get(part)
            if fname is None:
                raise ModelFormatError(f"config names no weight file for {part!r}")
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / fname),
                      metadata={"format": "stemgen-engine", "part": part})
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        default_permissions(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
