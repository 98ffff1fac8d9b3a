"""SwiGLU's elementwise step: silu(gate) * up, on the feed-forward's fused gate|up projection.
The fast variants read gate and up once and write the product once (PyTorch: three kernels)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Op, Variant, close, register


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """[N, 2h] (gate | up) -> silu(gate) * up [N, h]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _selfcheck(fn, device, dtype) -> str | None:
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    return None if close(fn(x), silu_mul_ref(x), dtype, loose=5) else "silu * up differs from its reference"


# measured on 2 cores of a Sapphire Rapids Xeon: 500 x 768 rows 0.13 ms against the C++ op's 0.25 ms,
# a demo-model step 9.0 ms against 9.6 ms (the C++ op stays the int8 feed-forward's building block)
BF16_TORCH_FASTER = "bf16: PyTorch's own ops are faster here (0.13 vs 0.25 ms for 500 x 768)"

OP = register(
    Op("silu_mul", "SwiGLU (silu * up)", silu_mul_ref, selfcheck=_selfcheck),
    Variant("cpp", "..cpp_ext:silu_mul", "C++ (cpp_ext, fused)", dtypes=(torch.float32, torch.bfloat16),
            declined={torch.bfloat16: BF16_TORCH_FASTER}),
    Variant("triton", ".swiglu_triton:silu_mul", "Triton (fused)"))
