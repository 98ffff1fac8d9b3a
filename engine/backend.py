"""Which implementation runs each hot-path op. Chosen once per model from its device and dtype:
the C++ extension on the CPU when it is built, the PyTorch reference ops otherwise (Triton on
CUDA is future work). STEMGEN_BACKEND=reference forces the reference ops everywhere.
`stemgen info` reports the choice; a CPU run without the extension says so once."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..kernels.embedding import embed_sum_ref
from ..kernels.sampling import guide_sample_rank_ref

log = logging.getLogger("stemgen")
_warned = False


@dataclass
class Ops:
    embed_sum: Callable = embed_sum_ref
    guide_sample_rank: Callable = guide_sample_rank_ref
    names: dict = field(default_factory=lambda: {"embedding-sum": "PyTorch reference",
                                                 "guidance+sampling": "PyTorch reference"})


def select_ops(device: torch.device, dtype: torch.dtype) -> Ops:
    global _warned
    choice = os.environ.get("STEMGEN_BACKEND", "auto")
    if choice not in ("auto", "reference", "cpp"):
        raise ValueError(f"STEMGEN_BACKEND={choice!r}: use auto, reference or cpp")
    if choice == "reference" or device.type != "cpu":
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
    ops.names = {"guidance+sampling": "C++ (cpp_ext)"}
    if dtype in (torch.float32, torch.bfloat16):
        ops.embed_sum = cpp_ext.embed_sum
        ops.names["embedding-sum"] = "C++ (cpp_ext)"
    else:
        ops.names["embedding-sum"] = f"PyTorch reference (C++ op takes fp32/bf16, not {dtype})"
    return ops
