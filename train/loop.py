"""Training-loop plumbing shared by the LM and codec trainers: atomic checkpoints, exact resume
(model, optimizer, schedule, data order, every RNG) and one error type for bad inputs."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from ..engine.errors import StemGenError
from ..engine.fileutil import atomic_file


class TrainError(StemGenError):
    """A bad corpus, checkpoint or option: reported as one line by the CLI."""


def machine_memory(device) -> int:
    """Bytes of memory a training run on ``device`` can have at most: the GPU's, or the machine's RAM."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def check_memory(what: str, n_bytes: float, device, options: str) -> None:
    """Refuse, before anything is allocated, a run whose estimated memory exceeds the device's."""
    have = machine_memory(device)
    if n_bytes > have:
        raise TrainError(f"{what} needs about {n_bytes / 2 ** 30:.1f} GiB to train, more than the "
                         f"{have / 2 ** 30:.1f} GiB of {torch.device(device).type}; lower {options}")


def atomic_torch_save(obj, path: str | Path) -> None:
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def rng_state(np_rng: np.random.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np_rng.bit_generator.state,
            "python": list(random.getstate()[1]), "python_v": random.getstate()[0]}


def restore_rng(state: dict, np_rng: np.random.Generator) -> np.random.Generator:
    torch.set_rng_state(state["torch"])
    np_rng.bit_generator.state = state["numpy"]
    random.setstate((state["python_v"], tuple(state["python"]), None))
    return np_rng


def load_resume(path: Path, kind: str, config: dict, log=print, defaults: dict | None = None) -> dict:
    """Read a resumable checkpoint (weights_only) and check it belongs to this run. Only ``steps``
    may differ (a run is extended or shortened; the schedule follows the new length). A setting
    the checkpoint lacks (added to the trainer later) counts as its value in ``defaults``; one it
    holds that ``config`` does not check (e.g. ``init_from``, which only matters at step 0) is ignored."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise TrainError(f"{path}: not a readable checkpoint ({type(e).__name__}); delete it or pass "
                         "another --out to start afresh") from None
    if not isinstance(state, dict) or state.get("kind") != kind:
        raise TrainError(f"{path}: not a {kind} training checkpoint; pass another --out")
    old = {k: v for k, v in (defaults or {}).items() if k in config}
    old.update({k: v for k, v in (state.get("config") or {}).items() if k in config})
    if old.get("steps") != config.get("steps") and "steps" in old:
        log(f"{path}: run length changed from {old['steps']} to {config['steps']} steps")
        old["steps"] = config["steps"]
        state["config"] = old
    if old != config:
        diff = sorted(k for k in set(config) | set(old) if old.get(k) != config.get(k))
        raise TrainError(f"{path}: checkpoint was trained with other settings ({', '.join(diff)}); "
                         "use the same options to resume, or another --out to start afresh")
    return state
