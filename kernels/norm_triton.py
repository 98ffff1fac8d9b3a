"""Triton RMSNorm and residual add + RMSNorm: the contracts of kernels.norm, one read and one write
of the rows (PyTorch runs five to seven kernels with fp32 intermediates)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, delta_ptr, w_ptr, xo_ptr, out_ptr, D, eps,
                     HAS_DELTA: tl.constexpr, BLOCK_D: tl.constexpr):
    """One row: [x += delta, written back to xo;] out = round(x / rms(x)) * w. fp32 statistics."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    m = offs < D
    x = tl.load(x_ptr + row * D + offs, mask=m, other=0.0)
    if HAS_DELTA:
        d = tl.load(delta_ptr + row * D + offs, mask=m, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(xo_ptr.dtype.element_ty)
        tl.store(xo_ptr + row * D + offs, x, mask=m)
    xf = x.to(tl.float32)
    n = (xf / tl.sqrt(tl.sum(xf * xf, 0) / D + eps)).to(out_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=m, other=0.0)
    tl.store(out_ptr + row * D + offs, (n.to(tl.float32) * w.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=m)


def _norm(x, delta, weight, eps):
    x = x.contiguous()
    N, D = x.shape
    out = torch.empty_like(x)
    xo = torch.empty_like(x) if delta is not None else out
    _rms_norm_kernel[(N,)](x, delta.contiguous() if delta is not None else x, weight, xo, out, D, float(eps),
                           HAS_DELTA=delta is not None, BLOCK_D=triton.next_power_of_2(D),
                           num_warps=8 if D >= 2048 else 4)
    return xo, out


def rms_norm(x, weight, eps):
    """Same contract as kernels.norm.rms_norm_ref (x [N, d]): one read and one write of the rows."""
    return _norm(x, None, weight, eps)[1]


def add_rms_norm(x, delta, weight, eps):
    """Same contract as kernels.norm.add_rms_norm_ref: the residual add fused into the norm."""
    return _norm(x, delta, weight, eps)
