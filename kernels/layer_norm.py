"""LayerNorm (with bias) and residual add + LayerNorm: MAGNeT's norms (audiocraft's
``nn.LayerNorm(d, eps=1e-5)``, pre-norm).

The reference is ``torch.nn.functional.layer_norm`` (one fused ATen kernel on the CPU, fp32
statistics in every dtype), so the CPU keeps it: a C++ variant would compute the same thing with
the same memory traffic. The Triton variant does the residual add and the norm in one read and one
write of the rows on CUDA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Op, Variant, close, register


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """x [N, d] -> (x - mean) / sqrt(var + eps) * weight + bias, in x's dtype."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def add_layer_norm_ref(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float):
    """Residual add, then LayerNorm of the sum: -> (x + delta, layer_norm(x + delta))."""
    x = x + delta
    return x, layer_norm_ref(x, weight, bias, eps)


def _example(device, dtype):
    g = torch.Generator().manual_seed(0)
    x, dx = (torch.randn(2, 5, 40, generator=g) * 2 + 0.5).to(device, dtype).unbind(0)
    return x, dx, torch.rand(40, generator=g).add(0.5).to(device, dtype), torch.randn(40, generator=g).to(device, dtype)


def _check_layer_norm(fn, device, dtype) -> str | None:
    x, _, w, b = _example(device, dtype)
    return None if close(fn(x, w, b, 1e-5), layer_norm_ref(x, w, b, 1e-5), dtype, loose=5) else \
        "LayerNorm differs from its reference"


def _check_add_layer_norm(fn, device, dtype) -> str | None:
    x, dx, w, b = _example(device, dtype)
    (x_new, h), (x_ref, h_ref) = fn(x, dx, w, b, 1e-5), add_layer_norm_ref(x, dx, w, b, 1e-5)
    return None if close(x_new, x_ref, dtype) and close(h, h_ref, dtype, loose=5) else \
        "residual add + LayerNorm differs from its reference"


LAYER_NORM = register(
    Op("layer_norm", "LayerNorm", layer_norm_ref, selfcheck=_check_layer_norm,
       reference_label="torch layer_norm (one fused ATen kernel)"),
    Variant("triton", ".layer_norm_triton:layer_norm", "Triton (one read, one write of the rows)"))

ADD_LAYER_NORM = register(
    Op("add_layer_norm", "residual add + LayerNorm", add_layer_norm_ref, selfcheck=_check_add_layer_norm,
       reference_label="add + torch layer_norm"),
    Variant("triton", ".layer_norm_triton:add_layer_norm", "Triton (fused: one read of x and delta)"))
