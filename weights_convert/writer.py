"""Atomic writing of an engine model directory: everything goes to a temporary sibling
directory that is renamed into place only once complete, so a failure leaves nothing behind."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..engine.config import CONFIG_FILE, ModelConfig, ModelFormatError, check_finite, is_model_dir
from ..engine.fileutil import atomic_dir, default_permissions, output_error


def _replaceable(out: Path) -> bool:
    """An empty folder, or an engine model folder: what --force may replace. A file or any other
    folder is the user's."""
    return out.is_dir() and not out.is_symlink() and (not any(out.iterdir()) or is_model_dir(out))


def write_model_dir(out: str | Path, config: ModelConfig, weights: dict[str, dict[str, torch.Tensor]],
                    overwrite: bool = False, extra=None) -> Path:
    """weights: {"lm": state, "codec": state-or-missing}; file names come from config.weights.
    ``extra(tmp)`` writes further parts (a MAGNeT model's text encoder folder) inside the same
    temporary directory."""
    out = Path(out)
    if out.name in ("", ".", ".."):
        raise ModelFormatError(f"--out {out} names no new folder; give the model folder's name, e.g. --out my-model")
    if out.exists() and not overwrite:
        raise ModelFormatError(f"{out}: already exists; choose another --out or pass --force to replace it")
    if out.exists() and not _replaceable(out):
        raise ModelFormatError(f"{out}: exists and is not an engine model folder; --force replaces only a model "
                               "folder (or an empty one): choose another --out")
    if not out.parent.is_dir():
        raise ModelFormatError(f"{out.parent}: output's parent folder does not exist; create it first")
    try:
        with atomic_dir(out, replace=overwrite) as tmp:
            for part, state in weights.items():
                fname = config.weights.get(part)
                if fname is None:
                    raise ModelFormatError(f"config names no weight file for {part!r}")
                check_finite(state, f"{part} weights")
                try:
                    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / fname),
                              metadata={"format": "stemgen-engine", "part": part})
                except (OSError, SafetensorError) as e:
                    raise output_error(out / fname, e) from None
                default_permissions(tmp / fname)  # safetensors creates 0600 files; one policy: the umask's
            if extra is not None:
                extra(tmp)
            try:
                (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
            except OSError as e:
                raise output_error(out / CONFIG_FILE, e) from None
    except FileExistsError:
        raise
    except OSError as e:   # the temporary folder could not be made, or renamed into place
        raise output_error(out, e) from None
    return out
