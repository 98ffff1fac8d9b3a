"""Embedding-sum: tokens of all channels and levels plus conditioning -> model input.

Table layout (engine format): ``tok_table`` [Q * (V + 2), dc] (level q's rows start at
q * (V + 2)); ``cond_table`` [sum(n_s + 1), dc] (source s's rows start at cond_offsets[s]).
"""
from __future__ import annotations

import torch


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
