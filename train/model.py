"""The StemGen LM in training form (SPEC section 3): readable, trainable, unfused.

tokens [B, C, Q, T] (C audio channels, the last one the target; Q RVQ levels; T frames),
conditions [B, S] (S conditioning sources, instrument first) -> logits [B, Q, T, codebook_size].
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import StemGenConfig
from .loop import atomic_torch_save


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(T: int, head_dim: int, theta: float, device=None):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(T, device=device, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()  # [T, head_dim/2]


def apply_rope(x, cos, sin):
    """Rotate-half RoPE on x [B, H, T, Dh]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: StemGenConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, d = x.shape
        H = self.n_heads
        q, k, v = (w(x).view(B, T, H, d // H).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v)  # non-causal
        return self.wo(out.transpose(1, 2).reshape(B, T, d))


class FeedForward(nn.Module):
    def __init__(self, cfg: StemGenConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: StemGenConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


def masked_batch(tokens, q: torch.Tensor, frac: torch.Tensor, mask_id: int, generator=None):
    """SPEC-5 masking with given levels q [B] and masked fractions frac [B] -> (input, masked [B, T])."""
    B, C, Q, T = tokens.shape
    masked = torch.rand(B, T, generator=generator, device=tokens.device) < frac[:, None]
    target = tokens[:, -1]
    levels = torch.arange(Q, device=tokens.device)[None, :, None]
    hide = (levels > q[:, None, None]) | ((levels == q[:, None, None]) & masked[:, None, :])
    inp = tokens.clone()
    inp[:, -1] = torch.where(hide, torch.full_like(target, mask_id), target)
    return inp, masked


class StemGenLM(nn.Module):
    def __init__(self, cfg: StemGenConfig):
        super().__init__()
        self.cfg = cfg
        dc = cfg.d_model // cfg.n_channels
        # one table per RVQ level, shared by all channels; rows: codes, MASK, NULL
        self.level_emb = nn.ModuleList(nn.Embedding(cfg.codebook_size + 2, dc) for _ in range(cfg.n_q))
        # one table per conditioning source; last row is NULL (dropped condition)
        self.cond_emb = nn.ModuleList(nn.Embedding(n + 1, dc) for n in cfg.cond_sizes)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.heads = nn.ModuleList(nn.Linear(cfg.d_model, cfg.codebook_size, bias=False) for _ in range(cfg.n_q))
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def embed(self, tokens, conditions):
        B, C, Q, T = tokens.shape
        cond = sum(table(conditions[:, s]) for s, table in enumerate(self.cond_emb))  # [B, dc]
        channels = []
        for c in range(C):
            e = sum(self.level_emb[q](tokens[:, c, q]) for q in range(Q))  # [B, T, dc]
            channels.append(e + cond[:, None, :])
        return torch.cat(channels, dim=-1)  # [B, T, d_model]

    def forward(self, tokens: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        assert tokens.shape[1:3] == (cfg.n_channels, cfg.n_q), tokens.shape
        x = self.embed(tokens, conditions)
        cos, sin = rope_tables(tokens.shape[-1], cfg.d_model // cfg.n_heads, cfg.rope_theta, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.norm(x)
        return torch.stack([head(x) for head in self.heads], dim=1)  # [B, Q, T, card]

    def training_loss(self, tokens, conditions, generator=None, blank_prob: float = 0.0):
        """SPEC 5 masking: one level q per example, cos-schedule mask on the target's level q,
        levels > q fully masked, context never masked; independent dropout of each conditioning
        source (the context audio -> NULL tokens, each categorical condition -> its NULL row), so
        the model learns the p(t | instrument) and p(t) that multi-source CFG asks for; CE on the
        masked positions. ``blank_prob`` (not in SPEC; default 0): that share of the examples is
        instead the sampler's first step (level 0, every frame of the target masked), where the
        target offers nothing to copy and only the context can tell the model what to play."""
        cfg = self.cfg
        B, C, Q, T = tokens.shape
        dev = tokens.device
        q = torch.randint(0, Q, (B,), device=dev, generator=generator)
        u = torch.rand(B, device=dev, generator=generator)
        frac = torch.cos(math.pi / 2 * u)
        if blank_prob > 0:
            blank = torch.rand(B, device=dev, generator=generator) < blank_prob
            q = torch.where(blank, 0, q)
            frac = torch.where(blank, 1.0, frac)
        inp, masked = masked_batch(tokens, q, frac, cfg.mask_id, generator)
        target = tokens[:, -1]  # [B, Q, T]
        drop = torch.rand(conditions.shape, device=dev, generator=generator) < cfg.cond_dropout
        nulls = torch.tensor(cfg.cond_sizes, device=dev)[None, :].expand_as(conditions)
        cond = torch.where(drop, nulls, conditions)
        deaf = torch.rand(B, device=dev, generator=generator) < cfg.cond_dropout  # the context source
        inp[:, :-1] = torch.where(deaf[:, None, None, None], cfg.null_id, inp[:, :-1])
        logits = self(inp, cond)  # [B, Q, T, card]
        sel = logits[torch.arange(B, device=dev), q]  # [B, T, card]
        tgt = target[torch.arange(B, device=dev), q]  # [B, T]
        return F.cross_entropy(sel[masked], tgt[masked])


def save_checkpoint(model: StemGenLM, path: str | Path, **extra) -> None:
    """A training checkpoint: the first source format users convert from (written, then renamed)."""
    atomic_torch_save({"format": "stemgen-train", "config": model.cfg.to_dict(),
                       "model": model.state_dict(), **extra}, path)


def load_checkpoint(path: str | Path, map_location="cpu") -> StemGenLM:
    ck = torch.load(path, map_location=map_location, weights_only=True)
    model = StemGenLM(StemGenConfig.from_dict(ck["config"]))
    model.load_state_dict(ck["model"])
    return model
