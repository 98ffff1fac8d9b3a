"""The transformer's elementwise steps: RMSNorm, residual add + RMSNorm, SwiGLU's silu(gate) * up.

PyTorch references, with the engine's numerics: statistics in fp32, the normalised value rounded
to the model dtype before the gain is applied (as the training-form model does). The Triton
versions (kernels.triton_ops) do each in one read and one write of the rows, where PyTorch runs
five to seven kernels with fp32 intermediates.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [N, d] -> x / rms(x) * weight, in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def add_rms_norm_ref(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """Residual add, then RMSNorm of the sum: -> (x + delta, rms_norm(x + delta))."""
    x = x + delta
    return x, rms_norm_ref(x, weight, eps)


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """[N, 2h] (gate | up) -> silu(gate) * up [N, h]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
