"""Triton attention of the packed batch: the contract of kernels.attention.attention_ref. A
flash-style kernel (online softmax, exp2) runs each query block of each sequence and head, with q
pre-scaled by softmax scale x log2 e. Where RoPE happens is part of its configuration
(`FlashConfig.rope`):
  "kernel": a RoPE kernel rotates q and k into contiguous copies, then the flash kernel runs;
  "q":      the RoPE kernel rotates k only; the flash kernel rotates its query block as it loads it;
  "fused":  one launch: the flash kernel rotates q and each key block as it loads them (so k is
            rotated once per query block).
With `FlashConfig.tma` the key and value blocks are read through tensor descriptors (TMA on Hopper):
a block may then run past its sequence into the next one's rows, which the softmax masks (keys) and
weighs by zero (values); past the last row the descriptor reads zeros.
Every configuration computes the reference's result (tests/test_op_attention.py); which is fastest
is a GPU measurement (bench/attn_sweep.py), and `attention_config` holds the measured choice."""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .attention import cu_seqlens as make_cu_seqlens

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class FlashConfig:
    block_m: int
    block_n: int
    warps: int
    stages: int = 3
    rope: str = "kernel"        # "kernel", "q" or "fused": see the module's docstring
    split_tail: bool = False    # full key blocks run without masks, the partial last block apart
    acc_in_dot: bool = False    # p @ v accumulates into acc inside the dot (no separate add)
    tma: bool = False           # k and v blocks through tensor descriptors (Hopper's TMA unit); for
    #                             16-bit dtypes: fp32 at the fp32 tiles computes right but spills registers

    def __post_init__(self):
        if self.rope not in ("kernel", "q", "fused"):
            raise ValueError(f"FlashConfig.rope is 'kernel', 'q' or 'fused', not {self.rope!r}")
        for name in ("block_m", "block_n"):
            n = getattr(self, name)
            if n < 16 or n & (n - 1):
                raise ValueError(f"FlashConfig.{name} is a power of two >= 16, not {n}")
        if self.warps not in (1, 2, 4, 8, 16) or self.stages < 1:
            raise ValueError(f"FlashConfig: warps is 1, 2, 4, 8 or 16 and stages >= 1, not {self.warps}, {self.stages}")

    def text(self) -> str:
        """``key=value,...``: what STEMGEN_FLASH_CONFIG takes (bench/attn_sweep.py prints these)."""
        return ",".join(f"{f.name}={int(v) if isinstance(v, bool) else v}"
                        for f in dataclasses.fields(self) for v in [getattr(self, f.name)])


ENV = "STEMGEN_FLASH_CONFIG"


@functools.lru_cache(maxsize=64)
def parse_flash_config(text: str, base: FlashConfig) -> FlashConfig:
    """``base`` with the ``key=value`` pairs of ``text`` (comma separated, as FlashConfig.text()
    writes them) applied; ValueError naming the problem otherwise."""
    fields = [f.name for f in dataclasses.fields(FlashConfig)]
    changes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or key not in fields:
            raise ValueError(f"{ENV}={text!r}: {part!r} is not key=value with a key of {', '.join(fields)}")
        kind = type(getattr(base, key))
        if kind is str:
            changes[key] = value
        elif kind is bool:
            if value not in ("0", "1"):
                raise ValueError(f"{ENV}={text!r}: {key} is 0 or 1, not {value!r}")
            changes[key] = value == "1"
        else:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{ENV}={text!r}: {key} is a whole number >= 1, not {value!r}")
            changes[key] = int(value)
    try:
        return dataclasses.replace(base, **changes)
    except ValueError as e:
        raise ValueError(f"{ENV}={text!r}: {e}") from None


def check_env() -> None:
    """ValueError (one line) if STEMGEN_FLASH_CONFIG is set and malformed."""
    attention_config(torch.bfloat16, 64)   # parses it


def attention_config(dtype: torch.dtype, dh: int) -> FlashConfig:
    """What the engine runs. Tiles that compile for sm_90 without register spills under Triton 3.6
    and 3.8 (tests/compile_sm90.py checks): fp32 (ieee dots, no tensor cores) needs smaller tiles,
    head dims over 64 need 8 warps. bf16 dh 64 (64, 64, 4 warps, RoPE kernel) as timed on an H200
    (bench/RESULTS.md); the other options are not yet timed on a GPU, so they stay off.
    STEMGEN_FLASH_CONFIG (e.g. ``rope=q,tma=1``) overrides the fields it names, for every dtype and
    head dim, for trying the sweep's choices in whole generations."""
    if dtype == torch.float32:
        base = FlashConfig(32, 16, 8) if dh > 64 else FlashConfig(64, 32, 8)
    else:
        base = FlashConfig(64, 64, 8) if dh > 64 else FlashConfig(64, 64, 4)
    text = os.environ.get(ENV)
    return parse_flash_config(text, base) if text else base


@triton.jit
def _sequence(cu_ptr, seq):
    """First packed row and length of sequence ``seq``."""
    start = tl.load(cu_ptr + seq)
    return start, tl.load(cu_ptr + seq + 1) - start


@triton.jit
def _cos_sin(cos_ptr, sin_ptr, pos, offs_h, mask, HALF):
    """cos and sin [positions, HALF] at positions ``pos``, columns ``offs_h``."""
    at = pos[:, None] * HALF + offs_h[None, :]
    return tl.load(cos_ptr + at, mask=mask, other=0.0), tl.load(sin_ptr + at, mask=mask, other=0.0)


@triton.jit
def _rotate(x1, x2, cs, sn, scale):
    """Rotate-half RoPE of the halves x1, x2 in fp32, times ``scale``: (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    return (x1 * cs - x2 * sn) * scale, (x2 * cs + x1 * sn) * scale


@triton.jit
def _joined(r1, r2, dtype: tl.constexpr):
    """The halves [rows, HALF] side by side: [rows, 2 HALF] in ``dtype``."""
    r = tl.reshape(tl.permute(tl.join(r1, r2), (0, 2, 1)), (r1.shape[0], 2 * r1.shape[1]))
    return r.to(dtype)


@triton.jit
def _load_rotated(ptr, rows, pos, mask, sn, sd, cos_ptr, sin_ptr, scale, DH: tl.constexpr):
    """Rows ``rows`` (positions ``pos``) of one head at ``ptr`` [.., DH], a power of two, rotated as
    they are loaded: [rows, DH] in ``ptr``'s dtype."""
    offs_h = tl.arange(0, DH // 2)
    m2 = mask[:, None]
    cs, sn_ = _cos_sin(cos_ptr, sin_ptr, pos, offs_h, m2, DH // 2)
    p = ptr + rows[:, None] * sn + offs_h[None, :] * sd
    x1 = tl.load(p, mask=m2, other=0.0)
    x2 = tl.load(p + (DH // 2) * sd, mask=m2, other=0.0)
    r1, r2 = _rotate(x1, x2, cs, sn_, scale)
    return _joined(r1, r2, ptr.dtype.element_ty)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cu_ptr, cos_ptr, sin_ptr, q_scale,
                 sqn, sqh, sqd, skn, skh, skd, HALF, DH,
                 BLOCK: tl.constexpr, HALF_P: tl.constexpr, ROTATE_Q: tl.constexpr):
    """RoPE of k (and of q, pre-scaled by ``q_scale``, when ROTATE_Q) for one block of one sequence's
    frames and one head, written contiguous [N, H, DH]."""
    pid = tl.program_id(0)
    h = tl.program_id(2)
    H = tl.num_programs(2)
    start, L = _sequence(cu_ptr, tl.program_id(1))
    if pid * BLOCK < L:
        offs = pid * BLOCK + tl.arange(0, BLOCK)          # positions within the sequence
        offs_h = tl.arange(0, HALF_P)
        m2 = (offs < L)[:, None] & (offs_h < HALF)[None, :]
        rows = start + offs
        out = (rows[:, None] * H + h) * DH + offs_h[None, :]
        cs, sn = _cos_sin(cos_ptr, sin_ptr, offs, offs_h, m2, HALF)
        if ROTATE_Q:
            pq = q_ptr + rows[:, None] * sqn + h * sqh + offs_h[None, :] * sqd
            r1, r2 = _rotate(tl.load(pq, mask=m2, other=0.0), tl.load(pq + HALF * sqd, mask=m2, other=0.0), cs, sn,
                             q_scale)
            tl.store(qo_ptr + out, r1.to(qo_ptr.dtype.element_ty), mask=m2)
            tl.store(qo_ptr + out + HALF, r2.to(qo_ptr.dtype.element_ty), mask=m2)
        pk = k_ptr + rows[:, None] * skn + h * skh + offs_h[None, :] * skd
        r1, r2 = _rotate(tl.load(pk, mask=m2, other=0.0), tl.load(pk + HALF * skd, mask=m2, other=0.0), cs, sn, 1.0)
        tl.store(ko_ptr + out, r1.to(ko_ptr.dtype.element_ty), mask=m2)
        tl.store(ko_ptr + out + HALF, r2.to(ko_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _attend(q, k_src, v_src, row0, n0, n_mask, col, m_i, l_i, acc, skn, skd, svn, svd, cos_ptr, sin_ptr, DH,
            BLOCK_N: tl.constexpr, DH_P: tl.constexpr, IEEE: tl.constexpr, MASKED: tl.constexpr,
            ROPE_K: tl.constexpr, ACC_IN_DOT: tl.constexpr, TMA: tl.constexpr):
    """One key block (packed rows row0.., positions n0..) of the online softmax: the new (m, l, acc).
    Without MASKED every key in the block is real. k_src and v_src: pointers at the head, or with
    TMA tensor descriptors [rows, heads x DH] whose head starts at column ``col``."""
    offs_n = tl.arange(0, BLOCK_N)
    rows, pos = row0 + offs_n, n0 + offs_n
    offs_d = tl.arange(0, DH_P)
    kv_mask = n_mask[:, None] & (offs_d < DH)[None, :]
    if TMA and ROPE_K:
        offs_h = tl.arange(0, DH_P // 2)
        cs, sn = _cos_sin(cos_ptr, sin_ptr, pos, offs_h, n_mask[:, None], DH_P // 2)
        r1, r2 = _rotate(k_src.load([row0, col]), k_src.load([row0, col + DH_P // 2]), cs, sn, 1.0)
        k = _joined(r1, r2, q.dtype)
    elif TMA:
        k = k_src.load([row0, col])
    elif ROPE_K:
        k = _load_rotated(k_src, rows, pos, n_mask, skn, skd, cos_ptr, sin_ptr, 1.0, DH_P)
    else:
        k = tl.load(k_src + rows[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    if MASKED:
        s = tl.where(n_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if TMA:
        v = v_src.load([row0, col])
    else:
        v = tl.load(v_src + rows[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
    p = p.to(v.dtype)
    if ACC_IN_DOT:
        if IEEE:
            acc = tl.dot(p, v, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p, v, acc * alpha[:, None])
    elif IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p, v)
    return m_new, l_i, acc


@triton.jit
def _flash_kernel(q_ptr, k_src, v_src, out_ptr, cu_ptr, cos_ptr, sin_ptr, q_scale,
                  sqn, sqh, sqd, skn, skh, skd, svn, svh, svd, son, soh, sod, DH,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DH_P: tl.constexpr, IEEE: tl.constexpr,
                  ROPE_Q: tl.constexpr, ROPE_K: tl.constexpr, SPLIT_TAIL: tl.constexpr,
                  ACC_IN_DOT: tl.constexpr, TMA: tl.constexpr):
    """Non-causal attention of one query block of one sequence and head, online softmax (exp2). q and
    k are rotated (and q pre-scaled) already, or rotated here when ROPE_Q / ROPE_K (q then scaled by
    ``q_scale``); every tensor may be strided. With TMA, k_src and v_src are tensor descriptors."""
    pid_m = tl.program_id(0)
    h = tl.program_id(2)
    start, L = _sequence(cu_ptr, tl.program_id(1))
    if pid_m * BLOCK_M < L:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < L
        offs_d = tl.arange(0, DH_P)
        d_mask = offs_d < DH
        if ROPE_Q:
            q = _load_rotated(q_ptr + h * sqh, start + offs_m, offs_m, m_mask, sqn, sqd, cos_ptr, sin_ptr, q_scale,
                              DH_P)
        else:
            q = tl.load(q_ptr + (start + offs_m)[:, None] * sqn + h * sqh + offs_d[None, :] * sqd,
                        mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        if not TMA:
            k_src += h * skh
            v_src += h * svh
        col = h * DH
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, DH_P], dtype=tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        if SPLIT_TAIL:
            n_full = L - L % BLOCK_N
            every = tl.full([BLOCK_N], 1, tl.int1)
            for n0 in range(0, n_full, BLOCK_N):
                m_i, l_i, acc = _attend(q, k_src, v_src, start + n0, n0, every, col, m_i, l_i, acc, skn, skd, svn,
                                        svd, cos_ptr, sin_ptr, DH, BLOCK_N, DH_P, IEEE, False, ROPE_K, ACC_IN_DOT,
                                        TMA)
            if n_full < L:
                m_i, l_i, acc = _attend(q, k_src, v_src, start + n_full, n_full, n_full + offs_n < L, col, m_i, l_i,
                                        acc, skn, skd, svn, svd, cos_ptr, sin_ptr, DH, BLOCK_N, DH_P, IEEE, True,
                                        ROPE_K, ACC_IN_DOT, TMA)
        else:
            for n0 in range(0, L, BLOCK_N):
                m_i, l_i, acc = _attend(q, k_src, v_src, start + n0, n0, n0 + offs_n < L, col, m_i, l_i, acc, skn,
                                        skd, svn, svd, cos_ptr, sin_ptr, DH, BLOCK_N, DH_P, IEEE, True, ROPE_K,
                                        ACC_IN_DOT, TMA)
        out = acc / l_i[:, None]
        tl.store(out_ptr + (start + offs_m)[:, None] * son + h * soh + offs_d[None, :] * sod,
                 out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def _descriptor(x: torch.Tensor, block: list[int], what: str):
    """x [N, H, Dh] (heads side by side in a row, as the engine's qkv views are) as a tensor
    descriptor over [N, H x Dh]."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    N, H, dh = x.shape
    if x.stride(2) != 1 or x.stride(1) != dh or x.data_ptr() % 16 or (x.stride(0) * x.element_size()) % 16:
        raise ValueError(f"FlashConfig.tma needs {what} rows of heads side by side, 16-byte aligned; got strides "
                         f"{tuple(x.stride())} at offset {x.data_ptr() % 16} of 16")
    return TensorDescriptor(x, [N, H * dh], [x.stride(0), 1], block)


def attention(q, k, v, segments, cos, sin, cu_seqlens=None, config: FlashConfig | None = None):
    """Same contract as kernels.attention.attention_ref; q, k, v [N, H, Dh] may be strided views.
    Pass ``cu_seqlens`` (built once per forward) to save building it in every layer; ``config``
    to run another configuration than `attention_config`'s (rope "q" and "fused", and tma, need a
    power-of-two head dim of 16 or more)."""
    N, H, dh = q.shape
    if dh % 2:
        raise ValueError(f"RoPE needs an even head dim, got {dh}")
    c = config or attention_config(q.dtype, dh)
    if (c.rope != "kernel" or c.tma) and (dh < 16 or dh & (dh - 1)):
        what = f"rope={c.rope!r}" if c.rope != "kernel" else "tma"
        raise ValueError(f"FlashConfig.{what} needs a power-of-two head dim >= 16, got {dh}")
    n_seqs = sum(R for R, _ in segments)
    max_len = max(T for _, T in segments)
    cu = cu_seqlens if cu_seqlens is not None else make_cu_seqlens(segments, q.device)
    cos, sin = cos.contiguous(), sin.contiguous()
    q_scale = LOG2E / math.sqrt(dh)
    if c.rope != "fused":          # rotated contiguous copies: k, and q too for "kernel"
        kr = torch.empty(N, H, dh, dtype=q.dtype, device=q.device)
        qr = torch.empty_like(kr) if c.rope == "kernel" else kr
        half = dh // 2
        _rope_kernel[(triton.cdiv(max_len, 32), n_seqs, H)](
            q, k, qr, kr, cu, cos, sin, q_scale, *q.stride(), *k.stride(), half, dh,
            BLOCK=32, HALF_P=triton.next_power_of_2(half), ROTATE_Q=c.rope == "kernel")
        k = kr
        if c.rope == "kernel":
            q = qr
    out = torch.empty(N, H, dh, dtype=q.dtype, device=q.device)
    k_src, v_src = k, v
    if c.tma:
        k_src = _descriptor(k, [c.block_n, dh // 2 if c.rope == "fused" else dh], "k")
        v_src = _descriptor(v, [c.block_n, dh], "v")
    _flash_kernel[(triton.cdiv(max_len, c.block_m), n_seqs, H)](
        q, k_src, v_src, out, cu, cos, sin, q_scale, *q.stride(), *k.stride(), *v.stride(), *out.stride(), dh,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, DH_P=max(16, triton.next_power_of_2(dh)),
        IEEE=q.dtype == torch.float32, ROPE_Q=c.rope != "kernel", ROPE_K=c.rope == "fused",
        SPLIT_TAIL=c.split_tail, ACC_IN_DOT=c.acc_in_dot, TMA=c.tma, num_warps=c.warps, num_stages=c.stages)
    return out.view(N, H * dh)
