"""CPU hot paths in C++ (pybind11 + OpenMP), built by `pip install` when a compiler is present.

Each op has the same contract as its PyTorch reference in stemgen.kernels, including the
counter-based noise of the sampling op, so CPU and other backends pick the same tokens for the
same logits. Shapes and dtypes are checked here; the C++ side checks ids (clear errors, never a
wild read). If the extension is not built, ``available()`` is False and ``load_error`` says why.
"""
from __future__ import annotations

import torch

from ..kernels.rng import STREAM_RANK, STREAM_SAMPLE, step_key

try:
    from . import _native
    load_error: str | None = None
except ImportError as e:  # not built (no compiler) or failed to load
    _native = None
    load_error = str(e)


def available() -> bool:
    return _native is not None


def status() -> str:
    if _native is None:
        return f"not loaded ({load_error}); PyTorch ops used instead"
    return f"loaded ({_native.num_threads()} OpenMP threads)" if _native.openmp else "loaded (no OpenMP)"


def _np(t: torch.Tensor, dtype: torch.dtype):
    if t.device.type != "cpu":
        raise ValueError(f"cpp_ext ops take CPU tensors, got {t.device}")
    if t.dtype != dtype:
        raise ValueError(f"expected dtype {dtype}, got {t.dtype}")
    t = t.contiguous()
    return t.view(torch.uint16).numpy() if dtype == torch.bfloat16 else t.numpy()


def embed_sum(tokens, conditions, tok_table, cond_table, cond_offsets) -> torch.Tensor:
    """Same contract as kernels.embedding.embed_sum_ref (fp32 or bf16 tables)."""
    dt = tok_table.dtype
    if dt not in (torch.float32, torch.bfloat16) or cond_table.dtype != dt:
        raise ValueError(f"embed_sum: tables must both be float32 or bfloat16, got {dt} / {cond_table.dtype}")
    if tokens.dim() != 4 or conditions.dim() != 2 or conditions.shape[0] != tokens.shape[0]:
        raise ValueError(f"embed_sum: tokens [B, C, Q, T] and conditions [B, S] expected, got "
                         f"{list(tokens.shape)} / {list(conditions.shape)}")
    if tok_table.shape[0] % tokens.shape[2] or cond_offsets.numel() != conditions.shape[1]:
        raise ValueError("embed_sum: table rows / condition offsets do not fit the token and condition shapes")
    fn = _native.embed_sum_bf16 if dt == torch.bfloat16 else _native.embed_sum_f32
    out = fn(_np(tokens, torch.int64), _np(conditions, torch.int64), _np(tok_table, dt), _np(cond_table, dt),
             _np(cond_offsets, torch.int64), dt == torch.bfloat16)
    out = torch.from_numpy(out)
    return out.view(torch.bfloat16) if dt == torch.bfloat16 else out


def guide_sample_rank(logits, weights, positions, masked, length: int, *, seed: int, level: int, step: int,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, w_confidence: float = 0.1,
                      w_causal: float = 0.1, w_random: float = 1.0):
    """Same contract as kernels.sampling.guide_sample_rank_ref."""
    R, M, V = logits.shape
    if weights.shape != (R,) or positions.shape != (M,) or masked.shape != (M,):
        raise ValueError(f"guide_sample_rank: weights [{R}], positions [{M}], masked [{M}] expected")
    tok, prob, score = _native.guide_sample_rank(
        _np(logits.float(), torch.float32), _np(weights.float(), torch.float32), _np(positions, torch.int64),
        _np(masked, torch.bool), int(length), step_key(seed, level, step, STREAM_SAMPLE),
        step_key(seed, level, step, STREAM_RANK), float(temperature), int(top_k), float(top_p), float(w_confidence),
        float(w_causal), float(w_random))
    return torch.from_numpy(tok), torch.from_numpy(prob), torch.from_numpy(score)


def magnet_sample(logits, positions, *, seed: int, level: int, step: int, coef: float, temperature: float,
                  top_k: int = 0, top_p: float = 0.9):
    """Same contract as kernels.magnet_sampling.magnet_sample_ref."""
    R, M, V = logits.shape
    if R not in (1, 2) or positions.shape != (M,):
        raise ValueError(f"magnet_sample: logits [1 or 2, M, V] and positions [{M}] expected, got {list(logits.shape)}")
    tok, prob = _native.magnet_sample(_np(logits.float(), torch.float32), _np(positions, torch.int64),
                                      step_key(seed, level, step, STREAM_SAMPLE), float(coef), float(temperature),
                                      int(top_k), float(top_p))
    return torch.from_numpy(tok), torch.from_numpy(prob)


def rvq_encode(x: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """x [N, D] fp32, codebooks [K, bins, D] fp32 -> codes [K, N] int64 (nearest entry per level,
    residual update), the contract of the codec's reference RVQ encode."""
    if x.dim() != 2 or codebooks.dim() != 3 or codebooks.shape[2] != x.shape[1]:
        raise ValueError(f"rvq_encode: x [N, D] and codebooks [K, bins, D] expected, got {list(x.shape)} / "
                         f"{list(codebooks.shape)}")
    return torch.from_numpy(_native.rvq_encode(_np(x.float(), torch.float32), _np(codebooks.float(), torch.float32)))


def _float_dtype(name: str, t: torch.Tensor) -> torch.dtype:
    if t.dtype not in (torch.float32, torch.bfloat16) or t.dim() != 2:
        raise ValueError(f"{name}: a 2-D float32 or bfloat16 tensor expected, got {t.dtype} {list(t.shape)}")
    return t.dtype


def _torch(a, dt: torch.dtype) -> torch.Tensor:
    out = torch.from_numpy(a)
    return out.view(torch.bfloat16) if dt == torch.bfloat16 else out


def _add_rms_norm(x, delta, weight, eps):
    dt = _float_dtype("add_rms_norm", x)
    if weight.shape != (x.shape[1],) or (delta is not None and delta.shape != x.shape):
        raise ValueError(f"add_rms_norm: x [N, d], delta [N, d], weight [d] expected, got {list(x.shape)}, "
                         f"{None if delta is None else list(delta.shape)}, {list(weight.shape)}")
    fn = _native.add_rms_norm_bf16 if dt == torch.bfloat16 else _native.add_rms_norm_f32
    xo, out = fn(_np(x, dt), None if delta is None else _np(delta, dt), _np(weight.to(dt), dt), float(eps),
                 dt == torch.bfloat16)
    return _torch(xo, dt), _torch(out, dt)


def rms_norm(x, weight, eps) -> torch.Tensor:
    """Same contract as kernels.norm.rms_norm_ref (x [N, d] float32 or bfloat16)."""
    return _add_rms_norm(x, None, weight, eps)[1]


def add_rms_norm(x, delta, weight, eps):
    """Same contract as kernels.norm.add_rms_norm_ref: (x + delta, rms_norm(x + delta))."""
    return _add_rms_norm(x, delta, weight, eps)


def silu_mul(gate_up) -> torch.Tensor:
    """Same contract as kernels.swiglu.silu_mul_ref ([N, 2h] -> silu(gate) * up [N, h])."""
    dt = _float_dtype("silu_mul", gate_up)
    fn = _native.silu_mul_bf16 if dt == torch.bfloat16 else _native.silu_mul_f32
    return _torch(fn(_np(gate_up, dt), dt == torch.bfloat16), dt)


def _int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] @ int8 [K, M] -> int32, exact: torch._int_mm, but for K == 1, where the CPU's
    torch._int_mm (torch 2.14) returns uninitialised memory: there the product is one exact int32 outer
    product."""
    if a.shape[1] == 1:
        return a.int() * b.int()
    return torch._int_mm(a, b)


def int8_linear(x, wq, scale) -> torch.Tensor:
    """Same contract as kernels.int8_linear.int8_linear_ref: the per-row quantization and the
    dequantization here (one pass each), the int8 GEMM PyTorch's (torch._int_mm: oneDNN)."""
    if x.dim() != 2 or wq.dim() != 2 or wq.dtype != torch.int8 or x.shape[1] != wq.shape[0] or scale.shape != (wq.shape[1],):
        raise ValueError(f"int8_linear: x [N, K], wq [K, M] int8, scale [M] expected, got {list(x.shape)} / "
                         f"{list(wq.shape)} {wq.dtype} / {list(scale.shape)}")
    xq, xs = _native.quantize_rows(_np(x.float(), torch.float32))
    acc = _int_mm(torch.from_numpy(xq), wq)
    return torch.from_numpy(_native.dequantize(_np(acc, torch.int32), xs, _np(scale.float(), torch.float32)))


def int8_linear2(x, wq, scale) -> torch.Tensor:
    """Same contract as kernels.int8_linear.int8_linear2_ref: x in two int8 parts (C++, one pass),
    both parts' rows in one int8 GEMM, dequantized in one pass."""
    q, s = _native.quantize_rows2(_np(x.float(), torch.float32))
    acc = _int_mm(torch.from_numpy(q), wq)
    return torch.from_numpy(_native.dequantize2(_np(acc, torch.int32), s, _np(scale.float(), torch.float32)))


def int8_swiglu(x, w13q, s13, w2q, s2) -> torch.Tensor:
    """Same contract as kernels.int8_linear.int8_swiglu_ref: x quantized, the gate|up int8 GEMM, then
    one C++ pass (dequantize, silu(gate) * up rounded as silu_mul_f32, quantize in two parts), the down
    int8 GEMM over both parts' rows, dequantized. Equal to int8_linear2(silu_mul(int8_linear(x, ...)),
    ...) of this module bit for bit."""
    H = w2q.shape[0] if w2q.dim() == 2 else -1
    if (x.dim() != 2 or w13q.dim() != 2 or w13q.dtype != torch.int8 or w2q.dtype != torch.int8
            or w13q.shape[1] != 2 * H or x.shape[1] != w13q.shape[0]
            or s13.shape != (2 * H,) or s2.shape != (w2q.shape[1],)):
        raise ValueError(f"int8_swiglu: x [N, K], w13q [K, 2H] int8, s13 [2H], w2q [H, M] int8, s2 [M] expected, "
                         f"got {list(x.shape)} / {list(w13q.shape)} / {list(s13.shape)} / {list(w2q.shape)} / "
                         f"{list(s2.shape)}")
    xq, xs = _native.quantize_rows(_np(x.float(), torch.float32))
    acc = _int_mm(torch.from_numpy(xq), w13q)
    hq, hs = _native.swiglu_quantize2(_np(acc, torch.int32), xs, _np(s13.float(), torch.float32))
    acc = _int_mm(torch.from_numpy(hq), w2q)
    return torch.from_numpy(_native.dequantize2(_np(acc, torch.int32), hs, _np(s2.float(), torch.float32)))


def _qkv_rows(q, k, v) -> torch.Tensor:
    """[N, 3 * H * dh]: the fused projection's output q, k, v were cut from (views of one buffer, as
    the model makes them: no copy), else the three stacked."""
    N, H, dh = q.shape
    same = q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    if (same and q.stride() == k.stride() == v.stride() == (3 * H * dh, dh, 1) and q.dtype == k.dtype == v.dtype
            and k.data_ptr() - q.data_ptr() == H * dh * q.element_size()
            and v.data_ptr() - k.data_ptr() == H * dh * q.element_size()):
        return q.as_strided((N, 3 * H * dh), (3 * H * dh, 1))
    return torch.stack([q, k, v], dim=1).reshape(N, 3 * H * dh)


def attention(q, k, v, segments, cos, sin, cu_seqlens=None) -> torch.Tensor:
    """Same contract as kernels.attention.attention_ref: RoPE and the [R, H, T, dh] layout in one C++
    pass (rope_pack), then torch's scaled_dot_product_attention per sequence group on contiguous
    tensors."""
    N, H, dh = q.shape
    dt = q.dtype
    if dt not in (torch.float32, torch.bfloat16) or k.shape != q.shape or v.shape != q.shape or dh % 2:
        raise ValueError(f"attention: q, k, v [N, H, dh] (dh even) float32 / bfloat16 expected, got "
                         f"{list(q.shape)} {dt}")
    segs = torch.tensor(segments, dtype=torch.int64).reshape(-1, 2)
    fn = _native.rope_pack_bf16 if dt == torch.bfloat16 else _native.rope_pack_f32
    qs, ks, vs = (_torch(a, dt) for a in fn(_np(_qkv_rows(q, k, v), dt), _np(cos.float(), torch.float32),
                                              _np(sin.float(), torch.float32), segs.numpy(), H,
                                              dt == torch.bfloat16))
    outs, start = [], 0
    for R, T in segments:
        part = (slice(start * H * dh, (start + R * T) * H * dh),)
        qg, kg, vg = (z[part].view(R, H, T, dh) for z in (qs, ks, vs))
        outs.append(torch.nn.functional.scaled_dot_product_attention(qg, kg, vg).transpose(1, 2).reshape(R * T, H * dh))
        start += R * T
    return torch.cat(outs) if len(outs) > 1 else outs[0]
