"""int8 trunk GEMMs for CPUs without bf16 units: weights int8 per output channel (symmetric,
quantized once at load), activations quantized per row at run time (symmetric, scale = max |x| /
127), an int8 x int8 -> int32 product, then both scales applied in fp32.

    x [N, K] fp32, wq [K, M] int8 (the weight transposed: the layout the GEMM reads fastest),
    scale [M] fp32  ->  [N, M] fp32

The int32 accumulation is exact, so a row's result never depends on the other rows of its batch
(batch invariance holds exactly, as for fp32 through engine.model.linear). The reference accumulates
the same integer products in fp64; the fast variant (cpp_ext.int8_linear) quantizes and dequantizes
in C++ (one pass each, the same float ops, so equal to the reference bit for bit) around PyTorch's
int8 GEMM (``torch._int_mm``: oneDNN's s8 kernels, VNNI / AMX-int8 where the CPU has them, AVX2
otherwise).

Without VNNI that GEMM is exact only for 7-bit weights: AVX2's ``vpmaddubsw`` multiplies the
activations (shifted by 128 into unsigned bytes) by the weights and adds each pair of products in
16 bits with saturation, which 8-bit weight codes overflow (2 x 255 x 127 = 64,770 > 32,767; ``all
127`` rows summed to 8,160 instead of 1,032,256). So the weights' code range is probed once per
process (weight_code_max): +-127 where the GEMM sums them exactly, +-63 where it does not."""
from __future__ import annotations

import functools

import torch

from .registry import Op, Variant, register
from .swiglu import silu_mul_ref


def quantize_rows(x: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, K] -> (int8 [N, K], fp32 scale [N]) with x ~ q * scale, codes within +-qmax (scale = max |x|
    / qmax); an all-zero row gets scale 1, a row holding NaN or inf codes 0 and scale NaN (its outputs
    NaN: never a finite result from it)."""
    x = x.float()
    scale = x.abs().amax(dim=1) / float(qmax)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    finite = scale.isfinite()   # a row with NaN or inf: codes 0 and scale NaN, so its outputs are NaN
    q = torch.where(finite[:, None], torch.round(x / scale[:, None]).clamp_(-qmax, qmax), 0.0).to(torch.int8)
    return q, torch.where(finite, scale, torch.full_like(scale, float("nan")))


# (rows, K, M) the probe runs: one row, the engine's shapes, a long K
_PROBE_SHAPES = ((1, 64, 16), (256, 256, 64), (7, 4099, 24))


def _int_mm_exact(qmax: int) -> bool:
    """Does torch._int_mm sum activations at full range (+-127) times weights within +-qmax exactly?
    Worst cases: every activation +-127 against every weight +-qmax, in all sign patterns."""
    for n, k, m in _PROBE_SHAPES:
        g = torch.Generator().manual_seed(n + k + m)
        a = torch.where(torch.rand(n, k, generator=g) < 0.5, -127, 127).to(torch.int8)
        a[0] = 127
        b = torch.where(torch.rand(k, m, generator=g) < 0.5, -qmax, qmax).to(torch.int8)
        b[:, 0] = qmax
        if not torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long()):
            return False
    return True


@functools.cache
def weight_code_max() -> tuple[int, str]:
    """(the weight codes' bound, why): 127 where this process's int8 GEMM (torch._int_mm) sums 8-bit
    weights exactly, 63 where only 7-bit ones (no VNNI: pairs of products saturate in 16 bits; see
    the module's docstring). Probed once on the worst cases; raises if neither is exact."""
    try:
        if _int_mm_exact(127):
            return 127, "+-127 (8 bits): this CPU's int8 GEMM sums them exactly"
    except RuntimeError as e:   # no int8 GEMM in this torch build: only the reference op runs
        return 127, f"+-127 (8 bits; torch._int_mm does not run here: {str(e).splitlines()[0][:120]})"
    if _int_mm_exact(63):
        return 63, ("+-63 (7 bits): this CPU's int8 GEMM (no VNNI) adds byte products in pairs in 16 bits, "
                    "which 8-bit weight codes overflow")
    raise RuntimeError("this CPU's int8 GEMM (torch._int_mm) is not exact even for 7-bit weights; "
                       "use --dtype float32")


def quantize_weight(w: torch.Tensor, qmax: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [M, K] (out, in) -> (wq [K, M] int8, scale [M] fp32): per output channel, codes within +-qmax
    (default: what this machine's int8 GEMM sums exactly, weight_code_max)."""
    q, scale = quantize_rows(w, weight_code_max()[0] if qmax is None else qmax)
    return q.t().contiguous(), scale


def int8_linear_ref(x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    xq, xs = quantize_rows(x)
    acc = xq.double() @ wq.double()                  # integers: exact in fp64 for any K here
    return (acc.float() * xs[:, None] * scale[None, :])


def quantize_rows2(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, K] in two int8 parts: (q1, s1) = quantize_rows(x), then the residual x - q1 * s1 the same
    way (q2, s2); x ~ q1 * s1 + q2 * s2, about 14 bits per value where one part keeps 7."""
    q1, s1 = quantize_rows(x)
    q2, s2 = quantize_rows(x.float() - q1.float() * s1[:, None])
    return q1, s1, q2, s2


def int8_linear2_ref(x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8_linear_ref with x in two int8 parts (quantize_rows2): two exact integer products."""
    q1, s1, q2, s2 = quantize_rows2(x)
    a1, a2 = (q.double() @ wq.double() for q in (q1, q2))
    return (a1.float() * s1[:, None] + a2.float() * s2[:, None]) * scale[None, :]


def int8_swiglu_ref(x: torch.Tensor, w13q: torch.Tensor, s13: torch.Tensor, w2q: torch.Tensor,
                    s2: torch.Tensor) -> torch.Tensor:
    """The SwiGLU feed-forward with both GEMMs int8: down(silu(gate) * up), gate|up = x @ w13; the down
    projection's input in two int8 parts (int8_linear2_ref). That input (silu(gate) * up: many small
    values beside a few large ones in a row) is where one int8 part per row loses most: on the demo
    it made about half the int8 path's logit error (40 held-out songs' guided distributions: total
    variation from fp32's 0.066 with one part, 0.039 with two, bench/logits-fidelity-demo-int8-*.json;
    that GEMM alone in fp32: 0.038, a one-off run not committed)."""
    return int8_linear2_ref(silu_mul_ref(int8_linear_ref(x, w13q, s13)), w2q, s2)


def _selfcheck(fn, device, dtype) -> str | None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 40, generator=g).to(device), torch.randn(24, 40, generator=g).to(device)
    wq, s = quantize_weight(w)
    return None if torch.allclose(fn(x, wq, s), int8_linear_ref(x, wq, s), rtol=1e-5, atol=1e-5) else \
        "int8 GEMM differs from its reference"


OP = register(Op("int8_linear", "int8 trunk GEMM (--dtype int8)", int8_linear_ref, selfcheck=_selfcheck,
                 reference_label="PyTorch reference (integer products in fp64)"),
              Variant("cpp", "..cpp_ext:int8_linear", "C++ row quantize / dequantize around torch._int_mm (oneDNN)"))


def _selfcheck_swiglu(fn, device, dtype) -> str | None:
    g = torch.Generator().manual_seed(0)
    x, w13, w2 = (torch.randn(*s, generator=g) for s in ((7, 40), (48, 40), (40, 24)))
    args = (x, *quantize_weight(w13), *quantize_weight(w2))
    want = int8_swiglu_ref(*args)
    return None if (fn(*args) - want).abs().max() <= 0.02 * want.abs().max() else \
        "int8 SwiGLU feed-forward differs from its reference"


SWIGLU = register(Op("int8_swiglu", "int8 SwiGLU feed-forward (--dtype int8)", int8_swiglu_ref,
                     selfcheck=_selfcheck_swiglu,
                     reference_label="PyTorch reference (int8_linear_ref, silu_mul_ref, int8_linear_ref)"),
                  Variant("cpp", "..cpp_ext:int8_swiglu", "C++: the gate|up product dequantized, silu * up and "
                          "quantized again (in two int8 parts) in one pass between the two int8 GEMMs"))
