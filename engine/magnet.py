"""The MAGNeT architecture (audiocraft's ``MagnetLMModel``; SPEC section 9) in the engine: one token
stream of Q levels, input = sum of the level embeddings + sinusoidal positions, pre-norm layers
(LayerNorm with bias) of self-attention (full at level 0, +-``band`` frames at levels >= 1),
cross-attention to the request's text memory and an exact-GELU feed-forward, then the final norm
and the active level's head. Built from the shared ops (engine.backend) and PackedLM, so the
request / scheduler / runner run it as they run a StemGen LM.

A request's "conditions" in the packed forward is a ``TextRows``: its text memory (T5 output
projected to d_model, or None), how many of its leading rows are conditioned on it (the others are
the unconditional CFG rows, whose cross-attention output is exactly zero in audiocraft: an all-zero
memory gives zero keys and values; here they skip the work), and the self-attention band of the
level being decoded. The memory's keys and values of every layer are computed once per request
and kept (audiocraft recomputes them at every step).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .backend import Ops
from .config import MagnetConfig
from .model import PackedLM, linear


def magnet_shapes(cfg: MagnetConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a MAGNeT engine LM file, by name."""
    d, h, Q, V = cfg.d_model, cfg.ffn_hidden, cfg.n_q, cfg.codebook_size
    shapes = {"tok_emb": (Q * (V + 1), d), "out_norm_w": (d,), "out_norm_b": (d,), "heads": (Q, V, d),
              "text_proj_w": (d, cfg.text_dim), "text_proj_b": (d,)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes.update({p + "norm1_w": (d,), p + "norm1_b": (d,), p + "wqkv": (3 * d, d), p + "wo": (d, d),
                       p + "norm_cross_w": (d,), p + "norm_cross_b": (d,), p + "cross_wq": (d, d),
                       p + "cross_wkv": (2 * d, d), p + "cross_wo": (d, d), p + "norm2_w": (d,),
                       p + "norm2_b": (d,), p + "w1": (h, d), p + "w2": (d, h)})
    return shapes


def sin_positions(T: int, d: int, max_period: float, device) -> torch.Tensor:
    """audiocraft's sinusoidal positions [T, d] fp32: phase = pos / max_period^(i / (d/2 - 1)),
    [cos(phase), sin(phase)] (cos half first); computed in fp64."""
    half = d // 2
    pos = torch.arange(T, dtype=torch.float64, device=device)[:, None]
    i = torch.arange(half, dtype=torch.float64, device=device)[None, :]
    phase = pos / max_period ** (i / max(half - 1, 1))
    return torch.cat([phase.cos(), phase.sin()], dim=-1).float()


@dataclass(eq=False)
class TextMemory:
    """One request's text conditioning: the projected memory [L, d] (model dtype, model device)
    and, once computed, the keys and values of every layer's cross-attention."""
    memory: torch.Tensor
    kv: list | None = field(default=None, repr=False)   # per layer (k [L, H, dh], v [L, H, dh])

    @property
    def length(self) -> int:
        return self.memory.shape[0]


@dataclass(eq=False)
class TextRows:
    """A request's conditions in the packed forward (see the module's docstring)."""
    text: TextMemory | None      # None: no row is conditioned
    n_text_rows: int             # its first n rows attend to ``text``; the others have no cross-attention
    window: int | None           # self-attention band for this step (None: full)


class MagnetLayer(nn.Module):
    def __init__(self, cfg: MagnetConfig):
        super().__init__()
        shapes = magnet_shapes(cfg)
        for name in ("norm1_w", "norm1_b", "wqkv", "wo", "norm_cross_w", "norm_cross_b", "cross_wq", "cross_wkv",
                     "cross_wo", "norm2_w", "norm2_b", "w1", "w2"):
            setattr(self, name, nn.Parameter(torch.empty(shapes[f"layers.0.{name}"])))


class MagnetLM(PackedLM):
    TRUNK_WEIGHTS = ("wqkv", "wo", "cross_wq", "cross_wo", "w1", "w2")
    OPS = ("embed_sum", "layer_norm", "add_layer_norm", "band_attention", "cross_attention", "gelu", "fold_guidance",
           "magnet_sample", "linear", "int8_linear")

    def __init__(self, cfg: MagnetConfig):
        super().__init__()
        self.cfg = cfg
        shapes = magnet_shapes(cfg)
        for name in ("tok_emb", "out_norm_w", "out_norm_b", "heads", "text_proj_w", "text_proj_b"):
            setattr(self, name, nn.Parameter(torch.empty(shapes[name])))
        self.layers = nn.ModuleList(MagnetLayer(cfg) for _ in range(cfg.n_layers))
        self.ops = Ops()
        self._pos_cache: dict = {}
        self.rebuild_buffers(None)

    def rebuild_buffers(self, device) -> None:
        # embed_sum's conditioning input: one zero row (MAGNeT has no categorical conditions)
        self.zero_cond = torch.zeros(1, self.cfg.d_model, dtype=self.heads.dtype, device=device)
        self.cond_offsets = torch.zeros(1, dtype=torch.int64, device=device)

    def positions(self, T: int, device) -> torch.Tensor:
        key = (T, str(device))
        cached = self._pos_cache   # one read: another thread may replace the dict (never mutate it)
        if key not in cached:
            cached = {key: sin_positions(T, self.cfg.d_model, self.cfg.max_period, device)}
            self._pos_cache = cached
        return cached[key]

    @torch.inference_mode()
    def project_text(self, t5_out: torch.Tensor) -> TextMemory:
        """T5 encoder output [L, text_dim] (one prompt, its own tokens: no padding) -> its memory:
        output_proj in fp32 (audiocraft's), then the model dtype."""
        if t5_out.dim() != 2 or t5_out.shape[1] != self.cfg.text_dim or t5_out.shape[0] < 1:
            raise ValueError(f"text conditioning must be [tokens, {self.cfg.text_dim}] (the T5 encoder's output), "
                             f"got {list(t5_out.shape)}")
        x = t5_out.to(self.device, torch.float32)
        mem = torch.addmm(self.text_proj_b.float(), x, self.text_proj_w.float().t())
        return TextMemory(mem.to(self.dtype))

    def text_kv(self, text: TextMemory) -> list:
        """Keys and values of the memory for every layer, computed once per request."""
        if text.kv is None:
            H, dh = self.cfg.n_heads, self.cfg.head_dim
            text.kv = [tuple(linear(text.memory, layer.cross_wkv).view(-1, 2, H, dh).unbind(1))
                       for layer in self.layers]
        return text.kv

    def embed(self, requests: list[tuple]) -> torch.Tensor:
        xs = []
        for tokens, _ in requests:
            R, T = tokens.shape[0], tokens.shape[-1]
            e = self.ops.embed_sum(tokens, self.cond_offsets.expand(R, 1), self.tok_emb, self.zero_cond,
                                   self.cond_offsets)                               # [R, T, d]
            xs.append((e.float() + self.positions(T, tokens.device)).to(self.dtype).reshape(R * T, -1))
        return xs[0] if len(xs) == 1 else torch.cat(xs)

    def hidden(self, requests: list[tuple]) -> torch.Tensor:
        """Final-norm hidden states [sum R*T, d] of the packed rows of all requests; ``requests`` are
        (tokens [R, 1, Q, T], TextRows) pairs."""
        cfg, ops, eps = self.cfg, self.ops, self.cfg.norm_eps
        H, dh = cfg.n_heads, cfg.head_dim
        segs = [(t.shape[0], t.shape[-1]) for t, _ in requests]
        windows = [c.window for _, c in requests]
        x = self.embed(requests)
        # the conditioned rows: a contiguous span of packed rows per request, their (rows, frames), memories
        spans, text_segs, texts, start = [], [], [], 0
        for (R, T), (_, c) in zip(segs, requests):
            if c.text is not None and c.n_text_rows:
                spans.append((start, start + c.n_text_rows * T))
                text_segs.append((c.n_text_rows, T))
                texts.append(c.text)
            start += R * T
        kvs = [self.text_kv(t) for t in texts]
        lengths = [t.length for t in texts]
        norms = [(layer.norm1_w, layer.norm1_b) for layer in self.layers] + [(self.out_norm_w, self.out_norm_b)]
        h = ops.layer_norm(x, *norms[0], eps)
        for i, layer in enumerate(self.layers):   # residual adds fused with the next norm where they can be
            q, k, v = linear(h, layer.wqkv).view(-1, 3, H, dh).unbind(1)
            a = ops.band_attention(q, k, v, segs, windows)
            x, h = ops.add_layer_norm(x, linear(a, layer.wo), layer.norm_cross_w, layer.norm_cross_b, eps)
            if spans:   # cross-attention of the conditioned rows only, added in place to their residual
                hq = h[spans[0][0]: spans[0][1]] if len(spans) == 1 else torch.cat([h[a: b] for a, b in spans])
                kc, vc = (kvs[0][i][j] if len(kvs) == 1 else torch.cat([kv[i][j] for kv in kvs]) for j in (0, 1))
                c = linear(ops.cross_attention(linear(hq, layer.cross_wq).view(-1, H, dh), kc, vc, text_segs, lengths),
                           layer.cross_wo)
                done = 0
                for a, b in spans:
                    x[a: b] += c[done: done + b - a]
                    done += b - a
            h = ops.layer_norm(x, layer.norm2_w, layer.norm2_b, eps)
            x, h = ops.add_layer_norm(x, linear(ops.gelu(linear(h, layer.w1)), layer.w2), *norms[i + 1], eps)
        return h
