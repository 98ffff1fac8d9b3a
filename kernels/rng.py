"""Counter-based random numbers: a uniform depends only on (seed, level, step, stream, index).

Results therefore do not depend on batch layout or on the backend: the PyTorch reference,
a Triton kernel and the C++ op all compute the same 32-bit hash (murmur3's fmix32).
"""
from __future__ import annotations

import torch

M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B1
STREAM_SAMPLE = 0   # inverse-CDF sampling uniform, index = position
STREAM_RANK = 1     # ranking noise U(0,1) of the causal-bias score, index = position


def fmix32(x: int) -> int:
    x &= M32
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & M32
    return x ^ (x >> 16)


def step_key(seed: int, level: int, step: int, stream: int) -> int:
    """32-bit key of one (request seed, level, step, stream); computed on the host."""
    s = (seed ^ (seed >> 32)) & M32
    return fmix32(s ^ fmix32(level ^ fmix32(step ^ fmix32(stream + 1))))


def _fmix32_t(x: torch.Tensor) -> torch.Tensor:
    # int64 arithmetic masked to 32 bits (products of two 32-bit values wrap identically mod 2^32)
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & M32
    return x ^ (x >> 16)


def uniform(key: int | torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1) (never 0 or 1) for int64 counters ``index``; ``key`` broadcasts."""
    if not isinstance(key, int):  # a Python int stays a kernel argument: no host-to-device copy
        key = torch.as_tensor(key, dtype=torch.int64, device=index.device)
    h = _fmix32_t((index * GOLDEN + key) & M32)
    h = _fmix32_t(h ^ key)
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
