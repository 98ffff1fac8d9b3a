"""The table of hot-path ops. Each op module (embedding, attention, norm, swiglu, sampling) holds
the op's PyTorch reference and registers one `Op`: the reference, the fast variants that share its
contract, and a small self-check. Backend selection (engine.backend), `stemgen info`, the per-op
tests (tests/test_op_*.py) and the op benchmarks (bench/test_ops_bench.py) all read this table,
so adding an op or a variant is one module and one registration.

Variants are named by module path and imported only when chosen: Triton is never imported on a
CPU run, the C++ extension never on a CUDA run."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch

BACKENDS = {"cpp": "cpu", "triton": "cuda"}   # backend -> the device it serves


@dataclass(frozen=True)
class Variant:
    backend: str                        # "cpp" (CPU) or "triton" (CUDA; the CPU only under TRITON_INTERPRET=1)
    target: str                         # "module:function", relative to this package
    label: str                          # what `stemgen info` says when it runs
    dtypes: tuple = ()                  # model dtypes it accepts (empty: all)
    declined: dict = field(default_factory=dict)  # dtype -> why the engine keeps the reference for it

    def load(self) -> Callable:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module, __package__), name)

    def accepts(self, dtype: torch.dtype) -> bool:
        """torch.int8 is the CPU's int8 path: everything but the trunk GEMMs computes in fp32."""
        compute = torch.float32 if dtype == torch.int8 else dtype
        return not self.dtypes or compute in self.dtypes

    def why_not(self, dtype: torch.dtype) -> str | None:
        """None if the engine runs this variant for a model of ``dtype``, else why not."""
        if not self.accepts(dtype):
            names = "/".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"the {self.backend} op takes {names}, not {str(dtype).replace('torch.', '')}"
        return self.declined.get(dtype)   # keyed by the model dtype: fp32 may decline what int8 runs


@dataclass
class Op:
    name: str                           # attribute of engine.backend.Ops, e.g. "embed_sum"
    title: str                          # its line in `stemgen info`
    reference: Callable
    reference_label: str = "PyTorch reference"
    selfcheck: Callable | None = None   # (fn, device, dtype) -> None, or what differs from the reference
    variants: dict = field(default_factory=dict)


OPS: dict[str, Op] = {}


def register(op: Op, *variants: Variant) -> Op:
    op.variants = {v.backend: v for v in variants}
    OPS[op.name] = op
    return op


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, loose: float = 1.0) -> bool:
    """The self-checks' tolerance: 1e-4 in fp32, 3e-2 in half precision (times ``loose``)."""
    tol = (1e-4 if dtype == torch.float32 else 3e-2) * loose
    return torch.allclose(got.float(), want.float(), rtol=tol, atol=tol)
