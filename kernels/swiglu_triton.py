"""Triton SwiGLU: the contract of kernels.swiglu.silu_mul_ref, one read of gate and up, one write."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, HID, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < HID
    g = tl.load(gu_ptr + row * 2 * HID + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * HID + HID + offs, mask=m, other=0.0).to(tl.float32)
    s = (g * tl.sigmoid(g)).to(out_ptr.dtype.element_ty)   # rounded like F.silu's output
    tl.store(out_ptr + row * HID + offs, (s.to(tl.float32) * u).to(out_ptr.dtype.element_ty), mask=m)


def silu_mul(gate_up):
    """Same contract as kernels.swiglu.silu_mul_ref ([N, 2h] -> [N, h])."""
    N, two_h = gate_up.shape
    h = two_h // 2
    out = torch.empty(N, h, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(h))
    _silu_mul_kernel[(N, triton.cdiv(h, block))](gate_up.contiguous(), out, h, BLOCK=block)
    return out
