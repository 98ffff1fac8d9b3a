"""Exact (erf) GELU, MAGNeT's feed-forward activation (audiocraft's ``F.gelu``, not the tanh form).

The reference is ``torch.nn.functional.gelu`` (one ATen kernel on the CPU: the CPU keeps it). The
Triton variant computes it in fp32 and rounds once, as ATen does."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Op, Variant, close, register


def gelu_ref(x: torch.Tensor) -> torch.Tensor:
    """x * Phi(x) (exact erf form), in x's dtype."""
    return F.gelu(x)


def _selfcheck(fn, device, dtype) -> str | None:
    x = (torch.randn(7, 33, generator=torch.Generator().manual_seed(0)) * 3).to(device, dtype)
    return None if close(fn(x), gelu_ref(x), dtype) else "GELU differs from its reference"


OP = register(
    Op("gelu", "GELU (exact)", gelu_ref, selfcheck=_selfcheck, reference_label="torch gelu (one ATen kernel)"),
    Variant("triton", ".gelu_triton:gelu", "Triton"))
