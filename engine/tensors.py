"""Checks of weight tensors against what a config expects: names, shapes, float dtypes, finiteness."""
from __future__ import annotations

from pathlib import Path

from .errors import ModelFormatError


def read_weights(path: str | Path, expected: dict, against: str, noun: str, missing_hint: str) -> dict:
    """Read an engine safetensors file (memory-mapped) after checking every tensor's name, shape and
    float dtype against ``expected``; errors name the file and the tensor."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: weight file missing; {missing_hint}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            check_shapes({k: sl.get_shape() for k, sl in slices.items()}, expected, str(path), against, noun)
            for name, sl in slices.items():
                if sl.get_dtype() not in ("F32", "F16", "BF16"):
                    raise ModelFormatError(f"{path}: {noun} {name!r} has dtype {sl.get_dtype()}, expected a float type")
            weights = {k: f.get_tensor(k) for k in expected}
    except SafetensorError as e:
        raise ModelFormatError(f"{path}: not a readable safetensors file ({e})") from None
    check_finite(weights, str(path), noun)
    return weights


def check_finite(weights: dict, where: str, noun: str = "tensor") -> None:
    """Reject NaN / infinite weights (a corrupt or overwritten file), naming the first bad tensor."""
    import torch

    for name, t in weights.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelFormatError(f"{where}: {noun} {name!r} holds NaN or infinite values (a corrupt file?); "
                                   "re-convert from an intact checkpoint")


def check_shapes(found: dict, expected: dict, where: str, against: str, noun: str = "tensor") -> None:
    """Names and shapes of ``found`` ({name: shape}) against ``expected``: one clear error naming
    the first missing, unexpected or misshapen tensor."""
    missing = [k for k in expected if k not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelFormatError(f"{where}: missing {noun} {missing[0]!r}{more} for {against}")
    extra = [k for k in found if k not in expected]
    if extra:
        raise ModelFormatError(f"{where}: {noun} {extra[0]!r} is not part of {against} (config and weights do "
                               "not match)")
    for k, shape in expected.items():
        if tuple(found[k]) != tuple(shape):
            raise ModelFormatError(f"{where}: {noun} {k!r} has shape {list(found[k])}, {against} expects "
                                   f"{list(shape)} (config and weights do not match)")
