"""fp32 trunk GEMMs on the CPU:

    x [N, K] fp32, w [M, K] (out, in)  ->  x @ w.T  [N, M] fp32

The reference is PyTorch's ``F.linear`` (MKL's sgemm in the x86 wheels): the GEMM the training-form
model runs, so an engine on the reference ops picks the training form's tokens bit for bit. The fast
variant is oneDNN's fp32 GEMM (``torch.ops.mkldnn._linear_pointwise``, the op torch's own compiler
emits for frozen CPU linears) on the weight reordered once at load into oneDNN's blocked layout
(``pack_weight``; the reorder is exact). On a 2-core Zen 4 EPYC it runs the trunk's shapes at
1.05-1.33x MKL's speed (the MAGNeT-small step 1.16-1.25x); its sums are ordered differently, so its
results differ from the reference in the last bits (the fp32 engine's tokens then match the training
form's only where no near-tie flips: `STEMGEN_BACKEND=reference` gives the bit-exact engine).

A row's result does not depend on the other rows of its batch for any row count but 1 (another
kernel): engine.model.linear pads CPU GEMMs to MIN_GEMM_ROWS rows for both, which keeps batch
invariance exact."""
from __future__ import annotations

import platform

import torch
import torch.nn.functional as F

from .registry import Op, Variant, close, register


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """w [M, K] fp32 -> the same values in oneDNN's blocked layout (an opaque mkldnn tensor; its
    ``to_dense()`` gives ``w`` back exactly), laid out for batches of about 1000 rows."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().float().contiguous(), 1000)


def linear_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w.to_dense() if w.is_mkldnn else w)


def linear_onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T for w packed by pack_weight (or a plain fp32 weight)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def _selfcheck(fn, device, dtype) -> str | None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 40, generator=g).to(device), torch.randn(24, 40, generator=g).to(device)
    return None if close(fn(x, pack_weight(w)), linear_ref(x, w), dtype) else "fp32 GEMM differs from its reference"


_DECLINED = {torch.int8: "the int8 path's trunk GEMMs are int8_linear's"}
if not torch.backends.mkldnn.is_available():
    _DECLINED[torch.float32] = "this torch is built without oneDNN"
elif platform.machine().lower() not in ("x86_64", "amd64"):
    _DECLINED[torch.float32] = "measured on x86 CPUs only"

OP = register(Op("linear", "fp32 trunk GEMM", linear_ref, selfcheck=_selfcheck,
                 reference_label="PyTorch reference (F.linear: the training form's GEMM, bit for bit)"),
              Variant("cpp", ".linear:linear_onednn", "oneDNN fp32 GEMM, weights reordered once at load into its "
                      "blocked layout", dtypes=(torch.float32,), declined=_DECLINED))
