"""Engine-native Encodec (SPEC section 2): SEANet encoder/decoder with weight norm folded away,
bottleneck LSTM, residual vector quantizer. Config-driven; no `encodec` / `torchaudio` import.

Weight names (engine format, ``codec.safetensors``), with i the position in the SEANet
sequence exactly as in the reference implementations:
  {encoder,decoder}.{i}.weight / .bias                 plain or transposed convolution
  {encoder,decoder}.{i}.block.{1,3}.weight / .bias     residual block convolutions
  {encoder,decoder}.{i}.shortcut.weight / .bias        residual shortcut (when true_skip is false)
  {encoder,decoder}.{i}.lstm.{weight,bias}_{ih,hh}_l{n} bottleneck LSTM
  quantizer.{k}.embed                                   RVQ codebook of level k [bins, dimension]
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import ModelFormatError
from .tensors import check_shapes, read_weights
from .threads import codec_threads, thread_count


@dataclass(frozen=True)
class CodecConfig:
    sample_rate: int = 32000
    channels: int = 1
    dimension: int = 128
    n_filters: int = 64
    ratios: tuple[int, ...] = (8, 5, 4, 4)   # decoder order; the encoder applies them reversed
    n_residual_layers: int = 1
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2
    lstm_layers: int = 2
    causal: bool = False
    pad_mode: str = "constant"               # audiocraft: constant; HF config: reflect
    true_skip: bool = True                   # identity residual shortcut
    trim_right_ratio: float = 1.0
    n_q: int = 4
    bins: int = 2048

    def __post_init__(self):
        object.__setattr__(self, "ratios", tuple(int(r) for r in self.ratios))
        if self.pad_mode not in ("constant", "reflect", "replicate"):
            raise ModelFormatError(f"codec config: pad_mode {self.pad_mode!r} not supported "
                                   "(constant, reflect, replicate)")
        width = self.n_filters * 2 ** len(self.ratios)
        if width > 8192 or not self.ratios:
            raise ModelFormatError(f"codec config: n_filters x 2^len(ratios) = {width} channels at the bottleneck; "
                                   "at most 8192 (and at least one ratio) are supported")

    @property
    def hop_length(self) -> int:
        return math.prod(self.ratios)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ratios"] = list(self.ratios)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CodecConfig":
        from .schema import CODEC_SPEC, check
        spec = {k: dataclasses.replace(f, required=False) for k, f in CODEC_SPEC.items()}
        return cls(**check(d, spec, "codec config"))


def layer_plan(cfg: CodecConfig, part: str) -> list[tuple]:
    """The SEANet sequence of ``part`` ("encoder"/"decoder"): one tuple per position i."""
    nf, plan = cfg.n_filters, []

    def res(dim):
        for j in range(cfg.n_residual_layers):
            plan.append(("res", dim, cfg.dilation_base ** j))

    if part == "encoder":
        plan.append(("conv", cfg.channels, nf, cfg.kernel_size, 1, 1))
        mult = 1
        for r in reversed(cfg.ratios):
            res(mult * nf)
            plan += [("elu",), ("conv", mult * nf, mult * nf * 2, 2 * r, r, 1)]
            mult *= 2
        if cfg.lstm_layers:
            plan.append(("lstm", mult * nf))
        plan += [("elu",), ("conv", mult * nf, cfg.dimension, cfg.last_kernel_size, 1, 1)]
    else:
        mult = 2 ** len(cfg.ratios)
        plan.append(("conv", cfg.dimension, mult * nf, cfg.kernel_size, 1, 1))
        if cfg.lstm_layers:
            plan.append(("lstm", mult * nf))
        for r in cfg.ratios:
            plan += [("elu",), ("convtr", mult * nf, mult * nf // 2, 2 * r, r)]
            res(mult * nf // 2)
            mult //= 2
        plan += [("elu",), ("conv", nf, cfg.channels, cfg.last_kernel_size, 1, 1)]
    return plan


def expected_codec_shapes(cfg: CodecConfig) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for part in ("encoder", "decoder"):
        for i, layer in enumerate(layer_plan(cfg, part)):
            p = f"{part}.{i}."
            kind = layer[0]
            if kind == "conv":
                _, cin, cout, k, _, _ = layer
                shapes[p + "weight"], shapes[p + "bias"] = (cout, cin, k), (cout,)
            elif kind == "convtr":
                _, cin, cout, k, _ = layer
                shapes[p + "weight"], shapes[p + "bias"] = (cin, cout, k), (cout,)
            elif kind == "res":
                dim, hidden = layer[1], layer[1] // cfg.compress
                shapes.update({p + "block.1.weight": (hidden, dim, cfg.residual_kernel_size),
                               p + "block.1.bias": (hidden,), p + "block.3.weight": (dim, hidden, 1),
                               p + "block.3.bias": (dim,)})
                if not cfg.true_skip:
                    shapes.update({p + "shortcut.weight": (dim, dim, 1), p + "shortcut.bias": (dim,)})
            elif kind == "lstm":
                d = layer[1]
                for n in range(cfg.lstm_layers):
                    shapes.update({f"{p}lstm.weight_ih_l{n}": (4 * d, d), f"{p}lstm.weight_hh_l{n}": (4 * d, d),
                                   f"{p}lstm.bias_ih_l{n}": (4 * d,), f"{p}lstm.bias_hh_l{n}": (4 * d,)})
    for k in range(cfg.n_q):
        shapes[f"quantizer.{k}.embed"] = (cfg.bins, cfg.dimension)
    return shapes


def rvq_encode_ref(x: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Residual VQ: x [N, D], codebooks [K, bins, D] -> codes [K, N]. Level k picks the entry nearest
    to the residual (d = ||r||^2 - 2 r.e + ||e||^2, as the reference implementations compute it)
    and subtracts it. The distances are one GEMM per level (faster here than the C++ op)."""
    residual, codes = x, []
    for embed in codebooks:
        dist = -(residual.pow(2).sum(1, keepdim=True) - 2 * residual @ embed.t() + embed.pow(2).sum(1)[None, :])
        idx = dist.max(dim=-1).indices
        residual = residual - embed[idx]
        codes.append(idx)
    return torch.stack(codes)


def _pad1d(x, left: int, right: int, mode: str):
    if mode == "reflect" and x.shape[-1] <= max(left, right):  # reflect needs length > pad
        extra = max(left, right) - x.shape[-1] + 1
        return F.pad(F.pad(x, (0, extra)), (left, right), mode)[..., : x.shape[-1] + left + right]
    return F.pad(x, (left, right), mode)


CHUNK_FRAMES = 1500    # 30 s at 50 frames/s: long audio is encoded / decoded chunk by chunk
MARGIN_FRAMES = 100    # 2 s of context on each side of a chunk


class Codec:
    """Inference-only Encodec: ``encode(audio [B, ch, N]) -> codes [B, Q, T]``, ``decode(codes) -> audio``."""

    def __init__(self, cfg: CodecConfig, weights: dict[str, torch.Tensor]):
        self.cfg = cfg
        self.w = weights
        self.plans = {part: layer_plan(cfg, part) for part in ("encoder", "decoder")}
        self.codebooks = torch.stack([weights[f"quantizer.{k}.embed"] for k in range(cfg.n_q)])  # [n_q, bins, D]
        self.lstms = {}
        for part, plan in self.plans.items():
            for i, layer in enumerate(plan):
                if layer[0] == "lstm":
                    lstm = torch.nn.LSTM(layer[1], layer[1], cfg.lstm_layers, device="meta")
                    lstm.load_state_dict({k.split("lstm.")[1]: v for k, v in weights.items()
                                          if k.startswith(f"{part}.{i}.lstm.")}, assign=True)
                    lstm.flatten_parameters()
                    self.lstms[(part, i)] = lstm.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.w["quantizer.0.embed"].device


    def _conv(self, x, name: str, stride: int = 1, dilation: int = 1):
        w = self.w[name + ".weight"]
        k = w.shape[-1]
        k_eff = (k - 1) * dilation + 1
        pad_total = k_eff - stride
        n_frames = (x.shape[-1] - k_eff + pad_total) / stride + 1
        extra = (math.ceil(n_frames) - 1) * stride + (k_eff - pad_total) - x.shape[-1]
        if self.cfg.causal:
            x = _pad1d(x, pad_total, extra, self.cfg.pad_mode)
        else:
            right = pad_total // 2
            x = _pad1d(x, pad_total - right, right + extra, self.cfg.pad_mode)
        return F.conv1d(x, w, self.w[name + ".bias"], stride=stride, dilation=dilation)

    def _convtr(self, x, name: str, stride: int):
        w = self.w[name + ".weight"]
        pad_total = w.shape[-1] - stride
        y = F.conv_transpose1d(x, w, self.w[name + ".bias"], stride=stride)
        right = math.ceil(pad_total * self.cfg.trim_right_ratio) if self.cfg.causal else pad_total // 2
        return y[..., pad_total - right: y.shape[-1] - right]

    def _run(self, part: str, x):
        for i, layer in enumerate(self.plans[part]):
            name, kind = f"{part}.{i}", layer[0]
            if kind == "conv":
                x = self._conv(x, name, stride=layer[4])
            elif kind == "convtr":
                x = self._convtr(x, name, stride=layer[4])
            elif kind == "elu":
                x = F.elu(x)
            elif kind == "res":
                y = self._conv(F.elu(x), name + ".block.1", dilation=layer[2])
                y = self._conv(F.elu(y), name + ".block.3")
                x = (x if self.cfg.true_skip else self._conv(x, name + ".shortcut")) + y
            elif kind == "lstm":
                t = x.permute(2, 0, 1)
                x = (self.lstms[(part, i)](t)[0] + t).permute(1, 2, 0)
        return x

    @torch.inference_mode()
    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """audio [B, channels, N] float -> codes [B, n_q, ceil(N / hop)] int64 (see _encode); on the
        CPU with engine.threads.codec_threads() threads, so its codes never depend on the caller's."""
        with self._threads():
            return self._encode(audio)

    def _threads(self):
        return thread_count(codec_threads()) if self.device.type == "cpu" else contextlib.nullcontext()

    def _encode(self, audio: torch.Tensor) -> torch.Tensor:
        """audio [B, channels, N] float -> codes [B, n_q, ceil(N / hop)] int64. Long inputs are
        encoded in chunks of CHUNK_FRAMES with MARGIN_FRAMES of context on each side (memory bounded
        by the chunk; codes away from chunk seams are those of one pass)."""
        hop = self.cfg.hop_length
        T = -(-audio.shape[-1] // hop)
        if T > CHUNK_FRAMES + 2 * MARGIN_FRAMES:
            parts = []
            for a in range(0, T, CHUNK_FRAMES):
                b = min(a + CHUNK_FRAMES, T)
                lo, hi = max(0, a - MARGIN_FRAMES), min(T, b + MARGIN_FRAMES)
                parts.append(self._encode(audio[..., lo * hop: hi * hop])[..., a - lo: b - lo])
            return torch.cat(parts, dim=-1)
        z = self._run("encoder", audio.to(self.device, torch.float32))    # [B, D, T]
        B, D, T = z.shape
        codes = rvq_encode_ref(z.transpose(1, 2).reshape(B * T, D), self.codebooks)
        return codes.view(self.cfg.n_q, B, T).transpose(0, 1).contiguous()

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, Q, T] (Q <= n_q) -> audio [B, channels, T * hop]; on the CPU with
        engine.threads.codec_threads() threads, so its samples never depend on the caller's."""
        with self._threads():
            return self._decode(codes)

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        codes = codes.to(self.device, torch.int64)
        if codes.shape[1] > self.cfg.n_q or (codes < 0).any() or (codes >= self.cfg.bins).any():
            raise ValueError(f"codes must be [B, <= {self.cfg.n_q}, T] with values in [0, {self.cfg.bins})")
        T, hop = codes.shape[-1], self.cfg.hop_length
        if T > CHUNK_FRAMES + 2 * MARGIN_FRAMES:   # in chunks, as encode
            parts = []
            for a in range(0, T, CHUNK_FRAMES):
                b = min(a + CHUNK_FRAMES, T)
                lo, hi = max(0, a - MARGIN_FRAMES), min(T, b + MARGIN_FRAMES)
                parts.append(self._decode(codes[..., lo:hi])[..., (a - lo) * hop: (b - lo) * hop])
            return torch.cat(parts, dim=-1)
        z = sum(F.embedding(codes[:, k], self.w[f"quantizer.{k}.embed"]) for k in range(codes.shape[1]))
        return self._run("decoder", z.transpose(1, 2))


def load_codec(path: str | Path, cfg: CodecConfig, device="cpu") -> Codec:
    """Load ``codec.safetensors`` after checking every tensor against the config."""
    weights = read_weights(path, expected_codec_shapes(cfg), "the codec config", "codec tensor",
                           "convert one with `stemgen convert --codec SRC`")
    return Codec(cfg, {k: v.to(device, torch.float32) for k, v in weights.items()})


def check_codec_weights(weights: dict, expected: dict, where: str) -> None:
    check_shapes({k: v.shape for k, v in weights.items()}, expected, where, "the codec config", noun="codec tensor")
