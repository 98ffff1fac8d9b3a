"""Training-loop plumbing shared by the LM and codec trainers: atomic checkpoints, exact resume
(model, optimizer, schedule, data order, every RNG) and one error type for bad inputs."""
from __future__ import annotations

import inspect
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import torch

from ..engine.errors import StemGenError
from ..engine.fileutil import atomic_file, output_error


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
    """torch.save to a temporary sibling renamed into place: a failed write (full disk, file-size
    limit) is one OutputError line, leaves no temporary and keeps the file it would have replaced."""
    try:
        with atomic_file(path) as tmp:
            torch.save(obj, tmp)
    except RuntimeError as e:   # torch's stream writer reports a failed write as a RuntimeError
        raise output_error(path, e) from None


class MetricsLog:
    """metrics.jsonl, appended one JSON line per record; a failed write is one OutputError line."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.f = open(self.path, "a")
        except OSError as e:
            raise output_error(self.path, e) from None

    def write(self, record: dict) -> None:
        try:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()
        except OSError as e:
            raise output_error(self.path, e) from None

    def close(self) -> None:
        try:
            self.f.close()
        except OSError:
            pass


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
    if not isinstance(state.get("config"), dict):
        raise TrainError(f"{path}: damaged checkpoint (its 'config' is not a mapping); delete it or pass another "
                         "--out to start afresh")
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


# --- a resumable checkpoint is untrusted: its structure is checked before anything is restored ----

class _Bad(Exception):
    pass


def _same(found, template, where: str) -> None:
    """``found`` has ``template``'s structure: the same keys, lengths, tensor shapes and dtypes
    (finite), scalar types (finite numbers); equal strings."""
    if isinstance(template, torch.Tensor):
        if not isinstance(found, torch.Tensor) or found.dtype != template.dtype or found.shape != template.shape:
            raise _Bad(f"{where} is not a {template.dtype} tensor of shape {list(template.shape)}")
        if found.is_floating_point() and not bool(torch.isfinite(found).all()):
            raise _Bad(f"{where} holds NaN or infinite values")
    elif isinstance(template, dict):
        if not isinstance(found, dict) or set(found) != set(template):
            raise _Bad(f"{where} does not have the entries {sorted(map(str, template))[:8]}")
        for k in template:
            _same(found[k], template[k], f"{where}.{k}")
    elif isinstance(template, (list, tuple)):
        if type(found) is not type(template) or len(found) != len(template):
            raise _Bad(f"{where} is not a {type(template).__name__} of {len(template)} items")
        for i, (a, b) in enumerate(zip(found, template)):
            _same(a, b, f"{where}[{i}]")
    elif isinstance(template, bool) or template is None or isinstance(template, str):
        if type(found) is not type(template) or (isinstance(template, str) and found != template):
            raise _Bad(f"{where} must be {template!r}-like, got {type(found).__name__}")
    elif isinstance(template, (int, float)):
        number = isinstance(found, (int, float)) and not isinstance(found, bool)
        if not number or (isinstance(template, int) and not isinstance(found, int)) or not math.isfinite(found):
            raise _Bad(f"{where} must be a finite {type(template).__name__}")
    else:  # pragma: no cover - templates come from this module
        raise _Bad(f"{where}: unexpected template {type(template).__name__}")


def _optimizer_template(opt: torch.optim.Optimizer) -> tuple[list, dict]:
    """(param_groups as a fresh state_dict has them, {param index: its per-parameter state}) with the
    state's entries as this torch version's optimizer creates them (one step on a scratch parameter)."""
    probe = torch.zeros(1, requires_grad=True)
    takes = inspect.signature(type(opt).__init__).parameters
    scratch = type(opt)([probe], **{k: v for k, v in opt.defaults.items() if k in takes})
    probe.grad = torch.zeros(1)
    scratch.step()
    entry = scratch.state[probe]
    sd = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for i, p in enumerate(params):
        state[i] = {k: (torch.empty(p.shape, dtype=v.dtype, device="meta") if v.dim() else v)
                    if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
    return sd["param_groups"], state


def _check_optimizer(found, opt, where: str) -> None:
    groups, state = _optimizer_template(opt)
    if not isinstance(found, dict) or set(found) != {"state", "param_groups"}:
        raise _Bad(f"{where} is not an optimizer state (state, param_groups)")
    got = found["param_groups"]
    if not isinstance(got, list) or len(got) != len(groups):
        raise _Bad(f"{where}.param_groups is not a list of {len(groups)} groups")
    for i, (g, t) in enumerate(zip(got, groups)):
        ids = g.get("params") if isinstance(g, dict) else None
        if not isinstance(ids, list) or not all(type(x) is int for x in ids) or ids != t["params"]:
            raise _Bad(f"{where}.param_groups[{i}] does not hold this model's parameters")
        for k, v in g.items():
            if k == "params":
                continue
            if k in t and (t[k] is None or isinstance(t[k], (bool, str))):
                # switches (amsgrad, fused, foreach, ...) change the state a step needs: this run's own
                if type(v) is not type(t[k]) or v != t[k]:
                    raise _Bad(f"{where}.param_groups[{i}].{k} is {str(v)[:20]!r}, this run's is {t[k]!r}")
            elif k in t:
                _same(v, t[k], f"{where}.param_groups[{i}].{k}")
            elif not (v is None or isinstance(v, (bool, int, float, str))):
                raise _Bad(f"{where}.param_groups[{i}].{k} is not a setting")
    st = found["state"]
    if not isinstance(st, dict) or not set(st) <= set(state):
        raise _Bad(f"{where}.state is not keyed by this model's parameters")
    for k, v in st.items():
        _same(v, state[k], f"{where}.state[{k}]")


def _check_scheduler(found, sched, step: int, where: str) -> None:
    template = sched.state_dict()
    # entries are set as the scheduler's attributes: none but its own, each of its type
    if not isinstance(found, dict) or not set(found) <= set(template) or "lr_lambdas" not in found:
        raise _Bad(f"{where} is not a learning-rate schedule state")
    for k, v in found.items():
        _same(v, template[k], f"{where}.{k}")
    if found.get("last_epoch") != step:
        raise _Bad(f"{where}.last_epoch {found.get('last_epoch')} is not the checkpoint's step {step}")


def _try(where: str, fn) -> None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - a setter's own check of a state it cannot take
        raise _Bad(f"{where} is not a valid generator state ({type(e).__name__})") from None


def check_numpy_state(v, where: str) -> None:
    def f():
        np.random.default_rng().bit_generator.state = v
    _try(where, f)


def check_torch_state(v, like: torch.Tensor, where: str, device="cpu") -> None:
    _same(v, like, where)
    _try(where, lambda: torch.Generator(device=device).set_state(v))


def check_python_state(state: dict, where: str) -> None:
    def f():
        if not isinstance(state.get("python"), list):
            raise TypeError("not a list")
        random.Random().setstate((state["python_v"], tuple(state["python"]), None))
    _try(where, f)


def check_resumable(state: dict, path: Path, model: torch.nn.Module, opt, sched, max_step: int, rng_check) -> None:
    """A resumable checkpoint's every part against the run it would resume, before any of it is
    restored: model tensors (names, shapes, dtypes, finite), optimizer and schedule states (the
    structure this torch makes; the schedule at the checkpoint's step), the step, the generators'
    states (``rng_check(state)`` raises for a bad one). One TrainError line otherwise."""
    try:
        step = state.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= max(max_step, 1 << 40):
            raise _Bad(f"step {str(step)[:40]!r} is not a step count")
        for key in ("model", "optimizer", "scheduler"):
            if key not in state:
                raise _Bad(f"'{key}' is missing")
        _same(state["model"], model.state_dict(), "model")
        _check_optimizer(state["optimizer"], opt, "optimizer")
        _check_scheduler(state["scheduler"], sched, step, "scheduler")
        rng_check(state)
    except _Bad as e:
        raise TrainError(f"{path}: damaged checkpoint ({str(e)[:300]}); delete it or pass another --out to "
                         "start afresh") from None
    except Exception as e:  # noqa: BLE001 - whatever else a crafted file trips is the same user error
        raise TrainError(f"{path}: damaged checkpoint ({type(e).__name__}); delete it or pass another --out to "
                         "start afresh") from None


def rank_states(world: int, gen: torch.Generator):
    """``rng_check`` of an LM checkpoint: one state per process (numpy, the masking generator, torch)."""
    def check(state: dict) -> None:
        ranks = state.get("ranks")
        if not isinstance(ranks, list) or len(ranks) != world:
            raise _Bad(f"'ranks' is not a list of {world} generator states")
        for i, r in enumerate(ranks):
            if not isinstance(r, dict) or set(r) != {"numpy", "gen", "torch"}:
                raise _Bad(f"ranks[{i}] does not have the entries gen, numpy, torch")
            check_numpy_state(r["numpy"], f"ranks[{i}].numpy")
            check_torch_state(r["gen"], gen.get_state(), f"ranks[{i}].gen", gen.device)
            check_torch_state(r["torch"], torch.get_rng_state(), f"ranks[{i}].torch")
    return check


def rng_states(state: dict) -> None:
    """``rng_check`` of a codec checkpoint: torch's, numpy's and Python's generator states."""
    r = state.get("rng")
    if not isinstance(r, dict) or set(r) != {"torch", "numpy", "python", "python_v"}:
        raise _Bad("'rng' does not have the entries numpy, python, python_v, torch")
    check_numpy_state(r["numpy"], "rng.numpy")
    check_torch_state(r["torch"], torch.get_rng_state(), "rng.torch")
    check_python_state(r, "rng.python")
