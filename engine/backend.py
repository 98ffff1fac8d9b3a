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
from ..kernels.sampling import guide_sample_rank_ref

log = logging.getLogger("stemgen")
_warned = False


@dataclass
class Ops:
    embed_sum: Callable = embed_sum_ref
    guide_sample_rank: Callable = guide_sample_rank_ref
    attention: Callable = attention_ref
    names: dict = field(default_factory=lambda: {
        "embedding-sum": "PyTorch reference", "guidance+sampling": "PyTorch reference",
        "attention": "RoPE + torch scaled_dot_product_attention per request (PyTorch reference)"})


def triton_ops(dtype: torch.dtype) -> Ops:
    """The Triton kernels (CUDA; on the CPU only under TRITON_INTERPRET=1, for tests)."""
    from ..kernels import triton_ops as K

    ops = Ops(embed_sum=K.embed_sum, attention=K.attention, guide_sample_rank=K.guide_sample_rank)
    ops.names = {"embedding-sum": "Triton", "attention": "Triton (flash-style, packed, RoPE fused)",
                 "guidance+sampling": "Triton (top-k/top-p requests: PyTorch reference)"}
    return ops


def select_ops(device: torch.device, dtype: torch.dtype) -> Ops:
    global _warned
    choice = os.environ.get("STEMGEN_BACKEND", "auto")
    if choice not in ("auto", "reference", "cpp", "triton"):
        raise ValueError(f"STEMGEN_BACKEND={choice!r}: use auto, reference, cpp or triton")
    if choice == "reference":
        return Ops()
    if device.type == "cuda" or choice == "triton":
        try:
            return triton_ops(dtype)
        except ImportError as e:
            if choice == "triton":
                raise RuntimeError(f"STEMGEN_BACKEND=triton but Triton is unavailable: {e}") from None
            log.warning("Triton unavailable (%s): PyTorch reference ops on %s", e, device)
            return Ops()
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
    return ops
