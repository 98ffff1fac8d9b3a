"""RMSNorm and residual add + RMSNorm, the transformer's norms.

PyTorch references, with the engine's numerics: statistics in fp32, the normalised value rounded
to the model dtype before the gain is applied (as the training-form model does). The fast
variants do each in one read and one write of the rows (their sums ordered differently from
PyTorch's: an fp32 engine picks the training-form model's tokens bit for bit only on the reference
ops, STEMGEN_BACKEND=reference, as its GEMMs are then the training form's too; kernels.linear).
"""
from __future__ import annotations

import torch

from .registry import Op, Variant, close, register

def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [N, d] -> x / rms(x) * weight, in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def add_rms_norm_ref(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """Residual add, then RMSNorm of the sum: -> (x + delta, rms_norm(x + delta))."""
    x = x + delta
    return x, rms_norm_ref(x, weight, eps)


def _example(device, dtype):
    g = torch.Generator().manual_seed(0)
    x, dx = torch.randn(2, 5, 40, generator=g).to(device, dtype).unbind(0)
    return x, dx, torch.rand(40, generator=g).to(device, dtype)


def _check_rms_norm(fn, device, dtype) -> str | None:
    x, _, w = _example(device, dtype)
    return None if close(fn(x, w, 1e-5), rms_norm_ref(x, w, 1e-5), dtype, loose=5) else \
        "RMSNorm differs from its reference"


def _check_add_rms_norm(fn, device, dtype) -> str | None:
    x, dx, w = _example(device, dtype)
    (x_new, h), (x_ref, h_ref) = fn(x, dx, w, 1e-5), add_rms_norm_ref(x, dx, w, 1e-5)
    return None if close(x_new, x_ref, dtype) and close(h, h_ref, dtype, loose=5) else \
        "residual add + RMSNorm differs from its reference"


RMS_NORM = register(
    Op("rms_norm", "RMSNorm", rms_norm_ref, selfcheck=_check_rms_norm),
    Variant("cpp", "..cpp_ext:rms_norm", "C++ (cpp_ext)", dtypes=(torch.float32, torch.bfloat16)),
    Variant("triton", ".norm_triton:rms_norm", "Triton (one read, one write of the rows)"))

ADD_RMS_NORM = register(
    Op("add_rms_norm", "residual add + RMSNorm", add_rms_norm_ref, selfcheck=_check_add_rms_norm),
    Variant("cpp", "..cpp_ext:add_rms_norm", "C++ (cpp_ext, fused)", dtypes=(torch.float32, torch.bfloat16)),
    Variant("triton", ".norm_triton:add_rms_norm", "Triton (fused: one read of x and delta)"))
