"""Which implementation runs each hot-path op. Chosen once per model from its device and dtype:
Triton kernels on CUDA, the C++ extension on the CPU when it is built, the PyTorch reference ops
otherwise. STEMGEN_BACKEND=reference forces the reference ops everywhere (=cpp / =triton force
those; triton on the CPU needs TRITON_INTERPRET=1).
`stemgen info` reports the choice; a CPU run without the extension says so once."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..kernels.attention import attention_ref
from ..kernels.embedding import embed_sum_ref
from ..kernels.norm import add_rms_norm_ref, rms_norm_ref, silu_mul_ref
from ..kernels.sampling import guide_sample_rank_ref

log = logging.getLogger("stemgen")
_warned = False


@dataclass
class Ops:
    embed_sum: Callable = embed_sum_ref
    guide_sample_rank: Callable = guide_sample_rank_ref
    attention: Callable = attention_ref
    rms_norm: Callable = rms_norm_ref
    add_rms_norm: Callable = add_rms_norm_ref
    silu_mul: Callable = silu_mul_ref
    names: dict = field(default_factory=lambda: {
        "embedding-sum": "PyTorch reference", "guidance+sampling": "PyTorch reference",
        "attention": "RoPE + torch scaled_dot_product_attention per request (PyTorch reference)",
        "norms, SwiGLU": "PyTorch reference"})


def triton_ops(dtype: torch.dtype) -> Ops:
    """The Triton kernels (CUDA; on the CPU only under TRITON_INTERPRET=1, for tests)."""
    from ..kernels import triton_ops as K

    ops = Ops(embed_sum=K.embed_sum, attention=K.attention, guide_sample_rank=K.guide_sample_rank,
              rms_norm=K.rms_norm, add_rms_norm=K.add_rms_norm, silu_mul=K.silu_mul)
    ops.names = {"embedding-sum": "Triton", "attention": "Triton (RoPE kernel + flash-style kernel, packed)",
                 "guidance+sampling": "Triton (top-k/top-p included up to 4096 codes; larger: PyTorch reference)",
                 "norms, SwiGLU": "Triton (fused residual add + RMSNorm, fused silu * up)"}
    return ops


_selfcheck: dict[tuple, str | None] = {}


def triton_selfcheck(device: torch.device, dtype: torch.dtype) -> str | None:
    """Compile and run each Triton kernel once on small shapes on ``device`` and compare it with its
    reference. Returns None if all agree, else what failed. Cached per (device, dtype)."""
    key = (str(device), dtype)
    if key in _selfcheck:
        return _selfcheck[key]
    from ..kernels import triton_ops as K

    problem = None
    try:
        g = torch.Generator().manual_seed(0)
        tok = torch.randint(0, 10, (2, 2, 4, 5), generator=g).to(device)
        cond = torch.randint(0, 3, (2, 1), generator=g).to(device)
        tab, ctab = torch.randn(40, 16, generator=g).to(device, dtype), torch.randn(4, 16, generator=g).to(device, dtype)
        off = torch.zeros(1, dtype=torch.long, device=device)
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        if not torch.allclose(K.embed_sum(tok, cond, tab, ctab, off).float(),
                              embed_sum_ref(tok, cond, tab, ctab, off).float(), rtol=tol, atol=tol):
            problem = "embedding-sum differs from its reference"
        q, k, v = torch.randn(3, 2 * 7 + 3, 2, 32, generator=g).to(device, dtype).unbind(0)
        ang = torch.outer(torch.arange(7.0), torch.rand(16, generator=g)).to(device)
        segs = [(2, 7), (1, 3)]
        a = K.attention(q, k, v, segs, ang.cos(), ang.sin()).float()
        b = attention_ref(q.float(), k.float(), v.float(), segs, ang.cos(), ang.sin()).float()
        if problem is None and (a - b).abs().max() > 5 * tol * max(1.0, float(b.abs().max())):
            problem = "attention differs from its reference"
        x, dx = torch.randn(2, 5, 40, generator=g).to(device, dtype).unbind(0)
        w = torch.rand(40, generator=g).to(device, dtype)
        x_new, h = K.add_rms_norm(x, dx, w, 1e-5)
        x_ref, h_ref = add_rms_norm_ref(x, dx, w, 1e-5)
        if problem is None and not (torch.allclose(x_new.float(), x_ref.float(), rtol=tol, atol=tol)
                                    and torch.allclose(h.float(), h_ref.float(), rtol=5 * tol, atol=5 * tol)):
            problem = "residual add + RMSNorm differs from its reference"
        if problem is None and not torch.allclose(K.silu_mul(x).float(), silu_mul_ref(x).float(), rtol=5 * tol,
                                                  atol=5 * tol):
            problem = "silu * up differs from its reference"
        logits = torch.randn(3, 6, 50, generator=g).to(device)
        args = (logits, torch.tensor([1.5, 1.0, -1.5], device=device), torch.arange(6, device=device),
                torch.ones(6, dtype=torch.bool, device=device), 6)
        if problem is None and not torch.equal(K.guide_sample_rank(*args, seed=1, level=0, step=0)[0],
                                               guide_sample_rank_ref(*args, seed=1, level=0, step=0)[0]):
            problem = "guidance+sampling picks other tokens than its reference"
    except Exception as e:  # compilation or launch failure
        problem = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    _selfcheck[key] = problem
    return problem


def select_ops(device: torch.device, dtype: torch.dtype) -> Ops:
    global _warned
    choice = os.environ.get("STEMGEN_BACKEND", "auto")
    if choice not in ("auto", "reference", "cpp", "triton"):
        raise ValueError(f"STEMGEN_BACKEND={choice!r}: use auto, reference, cpp or triton")
    if choice == "reference":
        return Ops()
    if device.type == "cuda" or choice == "triton":
        try:
            ops = triton_ops(dtype)
        except ImportError as e:
            if choice == "triton":
                raise RuntimeError(f"STEMGEN_BACKEND=triton but Triton is unavailable: {e}") from None
            log.warning("Triton unavailable (%s): PyTorch reference ops on %s", e, device)
            return Ops()
        problem = triton_selfcheck(device, dtype)
        if problem is None:
            return ops
        if choice == "triton":
            raise RuntimeError(f"STEMGEN_BACKEND=triton but the Triton kernels failed their self-check: {problem}")
        log.warning("Triton kernels failed their self-check on %s (%s): using the PyTorch reference ops", device,
                    problem)
        ops = Ops()
        ops.names = {k: f"{v} (Triton failed its self-check: {problem})" for k, v in ops.names.items()}
        return ops
    if device.type != "cpu":
        return Ops()
    from .. import cpp_ext

    if not cpp_ext.available():
        if choice == "cpp":
            raise RuntimeError(f"STEMGEN_BACKEND=cpp but the C++ extension is {cpp_ext.status()}")
        if not _warned:
            log.warning("C++ extension %s; reinstall with a C++ compiler (pip install -e .) for the fast CPU path",
                        cpp_ext.status())
            _warned = True
        return Ops()
    ops = Ops(guide_sample_rank=cpp_ext.guide_sample_rank)
    ops.names["guidance+sampling"] = "C++ (cpp_ext)"
    if dtype in (torch.float32, torch.bfloat16):
        ops.embed_sum = cpp_ext.embed_sum
        ops.names["embedding-sum"] = "C++ (cpp_ext)"
    else:
        ops.names["embedding-sum"] = f"PyTorch reference (C++ op takes fp32/bf16, not {dtype})"
    if dtype == torch.bfloat16:
        ops.rms_norm, ops.add_rms_norm, ops.silu_mul = cpp_ext.rms_norm, cpp_ext.add_rms_norm, cpp_ext.silu_mul
        ops.names["norms, SwiGLU"] = "C++ (cpp_ext: fused residual add + RMSNorm, fused silu * up)"
    else:  # fp32 keeps PyTorch's own sums, so the engine's tokens equal the fp32 training-form model's
        ops.names["norms, SwiGLU"] = "PyTorch reference (fp32: bit-for-bit the training-form model's norms)"
    return ops
