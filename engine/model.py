"""Lean inference-only StemGen LM: fused QKV and gate/up projections, flat embedding tables,
one forward that can return the logits of a single level's head."""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.attention import cu_seqlens
from .backend import Ops
from .config import LMConfig

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "int8": torch.int8}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A model dtype; torch.int8 is the CPU's int8 path (int8 trunk weights, fp32 everywhere else)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of float32, bfloat16, float16, int8 (CPU)")
    return DTYPES[dtype]


def stemgen_shapes(cfg: LMConfig) -> dict[str, tuple[int, ...]]:
    d, h, Q, V = cfg.d_model, cfg.ffn_hidden, cfg.n_q, cfg.codebook_size
    shapes = {
        "tok_emb": (Q * (V + 2), cfg.channel_dim),
        "cond_emb": (sum(n + 1 for n in cfg.cond_sizes), cfg.channel_dim),
        "norm": (d,),
        "heads": (Q, V, d),
    }
    for i in range(cfg.n_layers):
        shapes.update({f"layers.{i}.attn_norm": (d,), f"layers.{i}.wqkv": (3 * d, d),
                       f"layers.{i}.wo": (d, d), f"layers.{i}.ffn_norm": (d,),
                       f"layers.{i}.w13": (2 * h, d), f"layers.{i}.w2": (d, h)})
    return shapes


class Layer(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        d, h = cfg.d_model, cfg.ffn_hidden
        self.attn_norm = nn.Parameter(torch.empty(d))
        self.wqkv = nn.Parameter(torch.empty(3 * d, d))
        self.wo = nn.Parameter(torch.empty(d, d))
        self.ffn_norm = nn.Parameter(torch.empty(d))
        self.w13 = nn.Parameter(torch.empty(2 * h, d))
        self.w2 = nn.Parameter(torch.empty(d, h))


class PackedLM(nn.Module):
    """What every architecture shares: the packed forward over several requests' guidance rows and
    the level heads (``heads`` [Q, V, d]). An architecture defines ``hidden(pairs)``; the runner,
    scheduler and CUDA graphs only call these methods and never ask which architecture runs.
    Each architecture names its trunk GEMM weights per layer (``TRUNK_WEIGHTS``) and the ops its step
    runs (``OPS``: `stemgen info` shows a model's own)."""

    TRUNK_WEIGHTS: tuple[str, ...] = ()
    OPS: tuple[str, ...] = ()

    @property
    def dtype(self) -> torch.dtype:
        return self.heads.dtype

    @property
    def device(self) -> torch.device:
        return self.heads.device

    @torch.inference_mode()
    def forward_requests(self, requests: list[tuple], guidance: list | None = None) -> list[torch.Tensor]:
        """One forward over the guidance rows of several requests of different lengths, packed
        (no padding). Each request is (tokens [R, C, Q, T], conditions, level, positions):
        only head ``level`` is computed, and only at frames ``positions`` (int64 [M]; None: all).
        Returns per request fp32 logits [R, M, V]. Attention never mixes requests.
        ``guidance``: per request its guidance weights [R] (or None): the ``fold_guidance`` op may then
        run the head on their weighted sum and return [1, M, V] for it (kernels.guidance_fold)."""
        return self.level_logits(requests, self.hidden([(t, c) for t, c, _, _ in requests]), guidance)

    def level_logits(self, requests: list[tuple], x: torch.Tensor, guidance: list | None = None) -> list[torch.Tensor]:
        """fp32 logits of each request's level head at its positions, from the packed hidden states
        ``x`` [sum R*T, d] (see forward_requests)."""
        rows, start = [], 0
        for i, (tokens, _, level, positions) in enumerate(requests):
            R, T = tokens.shape[0], tokens.shape[-1]
            seg = x[start: start + R * T].view(R, T, -1)
            start += R * T
            seg = seg if positions is None else seg[:, positions]
            rows.append(seg if guidance is None or guidance[i] is None else self.ops.fold_guidance(seg, guidance[i]))
        out: list[torch.Tensor | None] = [None] * len(requests)
        for level in sorted({r[2] for r in requests}):  # one GEMM per level present
            idx = [i for i, r in enumerate(requests) if r[2] == level]
            flat = torch.cat([rows[i].reshape(-1, rows[i].shape[-1]) for i in idx])
            logits = head_logits(flat, self.heads[level])
            for i, part in zip(idx, logits.split([rows[i].shape[0] * rows[i].shape[1] for i in idx])):
                out[i] = part.view(rows[i].shape[0], rows[i].shape[1], -1)
        return out

    def hidden(self, requests: list[tuple]) -> torch.Tensor:
        raise NotImplementedError


class StemGenEngineLM(PackedLM):
    # the trunk GEMM weights of a layer (int8 on the CPU's int8 path) and the ops a step runs
    TRUNK_WEIGHTS = ("wqkv", "wo", "w13", "w2")
    OPS = ("embed_sum", "attention", "rms_norm", "add_rms_norm", "silu_mul", "fold_guidance", "guide_sample_rank",
           "linear", "int8_linear", "int8_swiglu")

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Parameter(torch.empty(stemgen_shapes(cfg)["tok_emb"]))
        self.cond_emb = nn.Parameter(torch.empty(stemgen_shapes(cfg)["cond_emb"]))
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.Parameter(torch.empty(cfg.d_model))
        self.heads = nn.Parameter(torch.empty(cfg.n_q, cfg.codebook_size, cfg.d_model))
        self.register_buffer("cond_offsets", _cond_offsets(cfg), persistent=False)
        self.ops = Ops()  # hot-path implementations; set for the device/dtype at load (engine.backend)
        self._rope_cache: dict = {}

    def rebuild_buffers(self, device) -> None:
        self.cond_offsets = _cond_offsets(self.cfg, device)

    def rope(self, T: int, device):
        """cos, sin [T, head_dim / 2] fp32 for positions 0..T-1, computed in fp64 on ``device`` (no
        host-to-device copy); the last table is kept."""
        key = (T, str(device))
        cached = self._rope_cache  # one read: another thread may replace the dict (never mutate it)
        if key in cached:
            return cached[key]
        dh = self.cfg.head_dim
        inv = 1.0 / self.cfg.rope_theta ** (torch.arange(0, dh, 2, dtype=torch.float64, device=device) / dh)
        ang = torch.outer(torch.arange(T, dtype=torch.float64, device=device), inv)
        tables = (ang.cos().float(), ang.sin().float())
        self._rope_cache = {key: tables}
        return tables

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, conditions: torch.Tensor, level: int | None = None) -> torch.Tensor:
        """tokens [B, C, Q, T], conditions [B, S] -> fp32 logits [B, T, V] for ``level``
        (only that head is computed) or [B, Q, T, V] for all levels."""
        if level is not None:
            return self.forward_requests([(tokens, conditions, level, None)])[0]
        B, _, Q, T = tokens.shape
        x = self.hidden([(tokens, conditions)])
        return torch.einsum("btd,qvd->bqtv", x.view(B, T, -1), self.heads).float()

    def hidden(self, requests: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Final-norm hidden states [sum R*T, d] of the packed rows of all requests."""
        cfg = self.cfg
        H, dh, d = cfg.n_heads, cfg.head_dim, cfg.d_model
        segs = [(t.shape[0], t.shape[-1]) for t, _ in requests]
        xs = [self.ops.embed_sum(t, c, self.tok_emb, self.cond_emb, self.cond_offsets).reshape(-1, d)
              for t, c in requests]
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        cos, sin = self.rope(max(T for _, T in segs), x.device)
        cu = cu_seqlens(segs, x.device)
        ops, eps = self.ops, cfg.norm_eps
        norms = [n for layer in self.layers for n in (layer.attn_norm, layer.ffn_norm)] + [self.norm]
        h = ops.rms_norm(x, norms[0], eps)
        for i, layer in enumerate(self.layers):   # each residual add is fused with the next norm
            q, k, v = linear(h, layer.wqkv).view(-1, 3, H, dh).unbind(1)
            x, h = ops.add_rms_norm(x, linear(ops.attention(q, k, v, segs, cos, sin, cu_seqlens=cu), layer.wo),
                                    norms[2 * i + 1], eps)
            x, h = ops.add_rms_norm(x, swiglu(ops, h, layer.w13, layer.w2), norms[2 * i + 2], eps)
        return h


# GEMM libraries pick another kernel for small row counts, whose results differ in the last
# bits; keeping every CPU GEMM at >= MIN_GEMM_ROWS rows keeps a request's logits (and so its
# tokens) independent of how many other requests share its batch.
MIN_GEMM_ROWS = 256


class Int8Weight:
    """A trunk weight of the int8 path (kernels.int8_linear): int8 [K, M] and per-channel scales,
    with the op that multiplies by it."""

    def __init__(self, w: torch.Tensor, op):
        from ..kernels.int8_linear import quantize_weight
        self.q, self.scale = quantize_weight(w)
        self.op = op

    @property
    def shape(self):
        return (self.q.shape[1], self.q.shape[0])


class PackedWeight:
    """A trunk weight of the fp32 CPU path in the layout of its GEMM op (kernels.linear: oneDNN's
    blocked layout, reordered once at load), with that op."""

    def __init__(self, w: torch.Tensor, op):
        from ..kernels.linear import pack_weight
        self.w, self.op = pack_weight(w), op

    @property
    def shape(self):
        return self.w.shape


def _replace_trunk(model: "PackedLM", make) -> None:
    """Replace every trunk GEMM weight (the architecture's TRUNK_WEIGHTS) by ``make(weight)``."""
    for layer in model.layers:
        for name in model.TRUNK_WEIGHTS:
            setattr(layer, name, make(layer._parameters.pop(name).detach()))


def quantize_trunk(model: "PackedLM") -> None:
    """Replace every trunk GEMM weight by its Int8Weight; the embeddings, norms, level heads and the
    sampling stay fp32."""
    _replace_trunk(model, lambda w: Int8Weight(w.float(), model.ops.int8_linear))


def pack_trunk(model: "PackedLM") -> None:
    """Where the model's ``linear`` op is not the reference (fp32 on the CPU: oneDNN), replace every
    trunk GEMM weight by its PackedWeight. The packed copies are process memory (the trunk's fp32
    size: 1.34 GB for MAGNeT-small); the weight file's pages they were read from stay mapped while
    the other tensors use the file, as clean page cache the system can reclaim."""
    from ..kernels.linear import linear_ref
    if model.ops.linear is not linear_ref:
        _replace_trunk(model, lambda w: PackedWeight(w, model.ops.linear))


def linear(x: torch.Tensor, w) -> torch.Tensor:
    if isinstance(w, Int8Weight):   # exact int32 products: rows independent of the batch, no padding
        return w.op(x, w.q, w.scale)
    fn, w = (w.op, w.w) if isinstance(w, PackedWeight) else (F.linear, w)
    n = x.shape[0]
    if n >= MIN_GEMM_ROWS or x.device.type != "cpu":
        return fn(x, w)
    return fn(torch.cat([x, x.new_zeros(MIN_GEMM_ROWS - n, x.shape[1])]), w)[:n]


def swiglu(ops, h: torch.Tensor, w13, w2) -> torch.Tensor:
    """down(silu(gate) * up), gate|up = h @ w13; on the int8 path one op (int8_swiglu), whose fp32
    gate|up product never reaches memory."""
    if isinstance(w13, Int8Weight):
        return ops.int8_swiglu(h, w13.q, w13.scale, w2.q, w2.scale)
    return linear(ops.silu_mul(linear(h, w13)), w2)


@functools.lru_cache(maxsize=None)
def mm_writes_fp32() -> bool:
    """Whether this torch has ``torch.mm(..., out_dtype=torch.float32)`` (bf16/fp16 GEMM with fp32
    output; CUDA). Probed on the meta device."""
    try:
        a = torch.empty(2, 2, device="meta", dtype=torch.bfloat16)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def head_logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 logits x @ w.T. On CUDA a bf16/fp16 GEMM writes them in fp32 directly: rounding logits to
    bf16 (up to 2^-9 relative) would be amplified by the guidance weights (3, 3, -5 sum 11 such
    errors). Elsewhere, or on a torch without it, the model-dtype GEMM is cast."""
    if x.device.type == "cuda" and x.dtype != torch.float32 and mm_writes_fp32():
        return torch.mm(x, w.t(), out_dtype=torch.float32)
    return linear(x, w).float()


def read_cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), []))
    except OSError:
        return frozenset()


@functools.lru_cache(maxsize=None)
def native_bf16_cpu() -> bool:
    """True when the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16)."""
    return bool({"avx512_bf16", "amx_bf16"} & read_cpu_flags())


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA and on CPUs with native bf16 arithmetic (about 1.5x faster there); else fp32."""
    if device.type == "cuda" or (device.type == "cpu" and native_bf16_cpu()):
        return torch.bfloat16
    return torch.float32


def _cond_offsets(cfg: LMConfig, device=None) -> torch.Tensor:
    """First row of each conditioning source in the flat ``cond_emb`` table."""
    offsets = [0]
    for n in cfg.cond_sizes[:-1]:
        offsets.append(offsets[-1] + n + 1)
    return torch.tensor(offsets, dtype=torch.int64, device=device)
