"""Embedding-sum: tokens of all channels and levels plus conditioning -> model input.

Table layout (engine format): ``tok_table`` [Q * (V + 2), dc] (level q's rows start at
q * (V + 2)); ``cond_table`` [sum(n_s + 1), dc] (source s's rows start at cond_offsets[s]).
"""
from __future__ import annotations

import torch

from .registry import Op, Variant, close, register


def embed_sum_ref(tokens: torch.Tensor, conditions: torch.Tensor, tok_table: torch.Tensor,
                  cond_table: torch.Tensor, cond_offsets: torch.Tensor) -> torch.Tensor:
    """tokens [B, C, Q, T] int64, conditions [B, S] int64 -> [B, T, C * dc] in the table dtype
    (accumulated in fp32)."""
    B, C, Q, T = tokens.shape
    rows_per_level = tok_table.shape[0] // Q
    level_off = torch.arange(Q, device=tokens.device).view(1, 1, Q, 1) * rows_per_level
    e = tok_table[tokens + level_off].float().sum(dim=2)           # [B, C, T, dc]
    cond = cond_table[conditions + cond_offsets].float().sum(dim=1)  # [B, dc]
    e = e + cond[:, None, None, :]
    return e.permute(0, 2, 1, 3).reshape(B, T, -1).to(tok_table.dtype)


def _selfcheck(fn, device, dtype) -> str | None:
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, 10, (2, 2, 4, 5), generator=g).to(device)
    cond = torch.randint(0, 3, (2, 1), generator=g).to(device)
    tab, ctab = torch.randn(40, 16, generator=g).to(device, dtype), torch.randn(4, 16, generator=g).to(device, dtype)
    off = torch.zeros(1, dtype=torch.long, device=device)
    if not close(fn(tok, cond, tab, ctab, off), embed_sum_ref(tok, cond, tab, ctab, off), dtype):
        return "embedding-sum differs from its reference"
    return None


OP = register(
    Op("embed_sum", "embedding-sum", embed_sum_ref, selfcheck=_selfcheck),
    Variant("cpp", "..cpp_ext:embed_sum", "C++ (cpp_ext)", dtypes=(torch.float32, torch.bfloat16)),
    Variant("triton", ".embedding_triton:embed_sum", "Triton"))
