"""Which implementation runs each hot-path op. Chosen once per model from its device and dtype,
op by op from the table in stemgen.kernels (each op's reference and fast variants): Triton
kernels on CUDA, the C++ extension on the CPU when it is built, the PyTorch reference otherwise
or where a variant does not take the model's dtype. STEMGEN_BACKEND=reference forces the
reference ops everywhere (=cpp / =triton force those; triton on the CPU needs TRITON_INTERPRET=1).
`stemgen info` reports the choice per op; a CPU run without the extension says so once."""
from __future__ import annotations

import logging
import os

import torch

from ..kernels import OPS

log = logging.getLogger("stemgen")
_warned: set[tuple[str, str]] = set()   # fallbacks already reported


class Ops:
    """One implementation per op of the table (attributes named as the ops, e.g. ``ops.attention``),
    the reference unless given; ``names[op]`` says which runs (for `stemgen info`)."""

    def __init__(self, **chosen):
        unknown = set(chosen) - set(OPS)
        if unknown:
            raise TypeError(f"unknown ops: {', '.join(sorted(unknown))} (the table has {', '.join(OPS)})")
        self.names = {}
        for op in OPS.values():
            setattr(self, op.name, chosen.get(op.name, op.reference))
            self.names[op.name] = op.reference_label if op.name not in chosen else "given"


def backend_ops(backend: str, dtype: torch.dtype) -> Ops:
    """Every op's ``backend`` variant where it has one that the engine runs for ``dtype``."""
    ops = Ops()
    for op in OPS.values():
        variant = op.variants.get(backend)
        if variant is None:
            continue
        why_not = variant.why_not(dtype)
        if why_not:
            ops.names[op.name] = f"{op.reference_label} ({why_not})"
        else:
            setattr(ops, op.name, variant.load())
            ops.names[op.name] = variant.label
    return ops


def triton_ops(dtype: torch.dtype) -> Ops:
    """The Triton kernels (CUDA; on the CPU only under TRITON_INTERPRET=1, for tests)."""
    return backend_ops("triton", dtype)


def unavailable(backend: str, device: torch.device | str = "cpu") -> str | None:
    """Why ``backend`` ("cpp" or "triton") cannot run on ``device`` in this process, or None."""
    if backend == "cpp":
        from .. import cpp_ext
        return None if cpp_ext.available() else f"C++ extension {cpp_ext.status()}"
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"Triton not installed ({e})"
    if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on CUDA, or on the CPU under TRITON_INTERPRET=1"
    return None


_selfcheck: dict[tuple, str | None] = {}


def selfcheck(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Run each op's ``backend`` variant once on small shapes on ``device`` (for Triton: compile
    it) and compare it with the reference. None if all agree, else what failed. Cached."""
    key = (backend, str(device), dtype)
    if key not in _selfcheck:
        problem = None
        try:
            for op in OPS.values():
                variant = op.variants.get(backend)
                if variant is not None and op.selfcheck is not None and variant.accepts(dtype):
                    problem = op.selfcheck(variant.load(), device, dtype)
                    if problem:
                        break
        except Exception as e:  # compilation or launch failure
            text = str(e).strip()
            problem = f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"
        _selfcheck[key] = problem
    return _selfcheck[key]


def triton_selfcheck(device: torch.device, dtype: torch.dtype) -> str | None:
    return selfcheck("triton", device, dtype)


HINTS = {"cpp": "; reinstall with a C++ compiler (pip install -e .) for the fast CPU path", "triton": ""}


def select_ops(device: torch.device, dtype: torch.dtype) -> Ops:
    choice = os.environ.get("STEMGEN_BACKEND", "auto")
    if choice not in ("auto", "reference", "cpp", "triton"):
        raise ValueError(f"STEMGEN_BACKEND={choice!r}: use auto, reference, cpp or triton")
    if choice == "reference":
        return Ops()
    backend = "triton" if device.type == "cuda" or choice == "triton" else "cpp" if device.type == "cpu" else None
    if backend is None:
        return Ops()
    missing = unavailable(backend, device)
    if missing is None and backend == "triton":
        from ..kernels.attention_triton import check_env
        check_env()   # a malformed STEMGEN_FLASH_CONFIG is the user's error, not a reason to fall back
        problem = triton_selfcheck(device, dtype)
        missing = problem and f"the Triton kernels failed their self-check: {problem}"
    if missing is None:
        return backend_ops(backend, dtype)
    if choice == backend:
        raise RuntimeError(f"STEMGEN_BACKEND={backend} but {missing}")
    if (missing, str(device)) not in _warned:   # once per cause and device
        log.warning("%s on %s: PyTorch reference ops%s", missing, device, HINTS[backend])
        _warned.add((missing, str(device)))
    ops = Ops()
    ops.names = {k: f"{v} ({missing})" for k, v in ops.names.items()}
    return ops
