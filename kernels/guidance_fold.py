"""Guidance folded into the level head's input:

    rows [R, M, d] (the final-norm hidden states of a request's R guidance rows at M frames),
    weights (R floats)  ->  the rows the level head runs on, and whose logits the sampler reads

Both guidance forms are linear in the rows' logits up to a constant per frame. StemGen's is
sum_r w_r log_softmax(l_r) = sum_r w_r l_r - c (kernels.sampling); MAGNeT's is
uncond + (cond - uncond) * coef = coef * cond + (1 - coef) * uncond (kernels.magnet_sampling).
A level head is linear without bias (l_r = h_r @ W.T), so sum_r w_r l_r = (sum_r w_r h_r) @ W.T:
the head can run on one row per frame, the rows' weighted sum, instead of R rows, and the sampler
reads that row's logits with weight 1. Sampling, top-k / top-p and the confidence see only
softmax(guided / temperature), which no per-frame constant changes.

The reference returns the rows unchanged (the head runs on all R, as the training form does, and an
engine on the reference ops keeps the training form's tokens bit for bit). The variant returns the
weighted sum [1, M, d], summed in fp32 and given the rows' dtype: a third of the head GEMM's rows and
of the sampler's reads with multi-source CFG, half with single-source. In fp32 (and the int8 path,
whose head is fp32) its distribution differs from the reference's in the last bits. In bf16 on the
CPU it is closer to fp32's than the reference: the CPU's bf16 head rounds each row's logits to bf16
before the guidance weights (3, 3, -5) amplify that rounding, where the folded sum is rounded once,
before the head (the demo, 40 held-out songs x bass, drums, every level, `bench/int8_fidelity.py
--dtype bfloat16 [--head-on-every-row]`: total variation from the fp32 distribution 0.024 mean against
0.028, top-1 96.4% against 95.9%; `bench/logits-fidelity-demo-bfloat16-{folded,every-row}.json`). On CUDA the bf16 head writes
fp32 logits, so the fold would add a rounding there: not measured on a GPU, it stays off in half
precision on CUDA."""
from __future__ import annotations

import torch

from .registry import Op, Variant, register


def fold_guidance_ref(rows: torch.Tensor, weights) -> torch.Tensor:
    return rows


def fold_guidance(rows: torch.Tensor, weights) -> torch.Tensor:
    """rows [R, M, d], weights R floats -> their weighted sum [1, M, d], in fp32 (one row: unchanged).
    Python floats: no weight tensor reaches the device."""
    if rows.shape[0] == 1:
        return rows
    acc = rows[0].float() * weights[0]
    for w, row in zip(weights[1:], rows[1:]):
        acc.add_(row.float(), alpha=w)
    return acc.unsqueeze(0).to(rows.dtype)


def guided_distribution(logits: torch.Tensor, weights) -> torch.Tensor:
    """Normalised guided log-probabilities [M, V] (temperature 1) from a level head's logits of either
    form: [R, M, V], one row per guidance weight, or [1, M, V], folded (weight 1). What the sampler's
    distribution is, to compare the two forms (and dtypes: bench/int8_fidelity.py)."""
    from .sampling import guided_logprobs   # imported here: this op registers before sampling's (step order)
    w = weights if logits.shape[0] == len(weights) else [1.0]
    return torch.log_softmax(guided_logprobs(logits, torch.tensor(w)), dim=-1)


def guided(rows: torch.Tensor, weights, head: torch.Tensor) -> torch.Tensor:
    """guided_distribution of the head ``head`` [V, d] on rows that fold_guidance (either form) returned."""
    return guided_distribution(rows.float() @ head.float().t(), weights)


def _selfcheck(fn, device, dtype) -> str | None:
    g = torch.Generator().manual_seed(0)
    rows, head = torch.randn(3, 5, 16, generator=g).to(device), torch.randn(40, 16, generator=g).to(device)
    weights = [3.0, 3.0, -5.0]
    got, want = guided(fn(rows, weights), weights, head), guided(rows, weights, head)
    return None if torch.allclose(got, want, rtol=1e-4, atol=1e-4) else "folded guidance changes the distribution"


OP = register(Op("fold_guidance", "guidance before the level head", fold_guidance_ref, selfcheck=_selfcheck,
                 reference_label="PyTorch reference (the head on every guidance row, as the training form)"),
              Variant("cpp", ".guidance_fold:fold_guidance", "folded: the head on the rows' weighted sum (one row "
                      "per frame instead of one per guidance row)", dtypes=(torch.float32, torch.bfloat16)),
              Variant("triton", ".guidance_fold:fold_guidance", "folded: the head on the rows' weighted sum",
                      declined={d: "the bf16 head writes fp32 logits on CUDA; a folded sum would be rounded to "
                                "bf16 once more (not measured on a GPU)" for d in (torch.bfloat16, torch.float16)}))
