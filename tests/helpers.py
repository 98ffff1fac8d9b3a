"""Shared test helpers: small random models in training form and their engine conversions."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from stemgen.engine.config import ModelConfig
from stemgen.engine.architectures import load_lm
from stemgen.train import StemGenConfig, StemGenLM, save_checkpoint
from stemgen.weights_convert import convert_train_checkpoint, write_model_dir


def random_train_model(cfg: StemGenConfig, seed: int = 0) -> StemGenLM:
    """Weights of a realistic scale (not the tiny init std), so parity errors are visible."""
    torch.manual_seed(seed)
    model = StemGenLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:      # norm gains
                p.uniform_(0.5, 1.5)
            elif "emb" in name:
                p.normal_(0, 1.0)
            else:
                p.normal_(0, 1.0 / math.sqrt(p.shape[1]))
    return model.eval()


def make_model_dir(tmp: Path, cfg: StemGenConfig, seed: int = 0, name: str = "model"):
    """Train-form model -> checkpoint -> `convert` -> engine dir. Returns (train model, dir)."""
    model = random_train_model(cfg, seed)
    ckpt = tmp / f"{name}.pt"
    save_checkpoint(model, ckpt)
    lm_cfg, instruments, state = convert_train_checkpoint(ckpt)
    out = write_model_dir(tmp / name, ModelConfig(lm=lm_cfg, instruments=instruments), {"lm": state})
    return model, out


def load_engine_lm(model_dir: Path, dtype="float32"):
    cfg = ModelConfig.load(model_dir)
    return load_lm(model_dir / cfg.weights["lm"], cfg.lm, dtype=dtype)


def random_tokens(cfg: StemGenConfig, B: int, T: int, gen: torch.Generator, special: bool = True):
    """Tokens [B, C, Q, T]; with special=True MASK and NULL ids appear too."""
    hi = cfg.codebook_size + (2 if special else 0)
    tokens = torch.randint(0, hi, (B, cfg.n_channels, cfg.n_q, T), generator=gen)
    conds = torch.stack([torch.randint(0, n + 1, (B,), generator=gen) for n in cfg.cond_sizes], dim=1)
    return tokens, conds


TINY_CODEC = dict(n_filters=4, dimension=16, bins=32, lstm_layers=1)


def tiny_model_dir(tmp: Path, name: str = "tiny", seed: int = 0) -> Path:
    """A complete engine model directory (tiny LM + tiny random codec) for end-to-end CLI tests."""
    from stemgen.engine.codec import CodecConfig
    from stemgen.engine.config import CODEC_WEIGHTS, LM_WEIGHTS
    from stemgen.random_model import random_codec_weights
    from stemgen.weights_convert.lm import convert_train_state, engine_lm_config

    codec_cfg = CodecConfig(**TINY_CODEC)
    cfg = StemGenConfig(d_model=32, n_heads=2, n_layers=1, codebook_size=codec_cfg.bins, ffn_multiple_of=16,
                        instruments=["bass", "drums", "[/]x"])
    lm = random_train_model(cfg, seed)
    config = ModelConfig(lm=engine_lm_config(cfg), instruments=list(cfg.instruments), codec=codec_cfg.to_dict(),
                         weights={"lm": LM_WEIGHTS, "codec": CODEC_WEIGHTS})
    return write_model_dir(tmp / name, config, {"lm": convert_train_state(cfg, lm.state_dict()),
                                                "codec": random_codec_weights(codec_cfg, seed)})


def backend_missing(backend: str) -> str | None:
    """Why a fast backend cannot run in this test process, or None."""
    from stemgen.engine.backend import unavailable
    return unavailable(backend, "cuda" if torch.cuda.is_available() else "cpu")


def on_cuda(fn):
    """fn run on CUDA copies of its tensor arguments, its tensor results brought back to the CPU
    (the op tests build CPU tensors; on a GPU machine the Triton kernels get device tensors)."""
    import functools

    def move(x, dev):
        if isinstance(x, torch.Tensor):
            return x.to(dev)
        if isinstance(x, (tuple, list)):
            return type(x)(move(y, dev) for y in x)
        return x

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        out = fn(*move(args, "cuda"), **{k: move(v, "cuda") for k, v in kwargs.items()})
        return move(out, "cpu")
    return wrapped


def variants(op_name: str, dtypes=(torch.float32,)):
    """pytest params (fn, dtype), one per fast variant of the op in the kernels table and dtype it
    takes, ids like ``cpp-bfloat16``; a backend absent here is a skip that says why."""
    import pytest

    from stemgen.kernels import OPS

    params = []
    for backend, variant in OPS[op_name].variants.items():
        missing = backend_missing(backend)
        for dtype in dtypes:
            if variant.accepts(dtype):
                fn = None if missing else variant.load()
                if fn is not None and backend == "triton" and torch.cuda.is_available():
                    fn = on_cuda(fn)
                params.append(pytest.param(fn, dtype, id=f"{backend}-{str(dtype).replace('torch.', '')}",
                                           marks=[pytest.mark.skipif(missing is not None, reason=missing or "")]))
    return params


def _needs_cpp():
    import pytest
    missing = backend_missing("cpp")
    return pytest.mark.skipif(missing is not None, reason=str(missing))


NEEDS_CPP = _needs_cpp()   # a mark for the tests of the C++ ops' own checks


def on_device(fn):
    """``fn`` itself on a machine without CUDA; on a GPU machine, on CUDA copies (on_cuda)."""
    return on_cuda(fn) if torch.cuda.is_available() else fn


def tiny_audiocraft_codec(path: Path, bins: int = 256, seed: int = 0) -> Path:
    """A tiny random Encodec 32 kHz (SEANet 4 filters, ratios 8,5,4,4, 1 LSTM layer, 4 x ``bins`` RVQ)
    saved as audiocraft's compression_state_dict.bin, for end-to-end tests of converted models."""
    from encodec.modules import SEANetDecoder, SEANetEncoder
    from encodec.quantization import ResidualVectorQuantizer

    torch.manual_seed(seed)
    sea = dict(channels=1, dimension=16, n_filters=4, ratios=[8, 5, 4, 4], n_residual_layers=1, true_skip=True,
               pad_mode="constant", causal=False, norm="weight_norm", lstm=1, compress=2)
    model = torch.nn.ModuleDict({"encoder": SEANetEncoder(**sea), "decoder": SEANetDecoder(**sea),
                                 "quantizer": ResidualVectorQuantizer(dimension=16, n_q=4, bins=bins)}).eval()
    with torch.no_grad():
        for layer in model["quantizer"].vq.layers:
            layer._codebook.embed.normal_()
    xp = (f"sample_rate: 32000\nchannels: 1\ncompression_model: encodec\nencodec: {{causal: false, renormalize: false}}\n"
          f"seanet: {{dimension: 16, n_filters: 4, n_residual_layers: 1, ratios: [8, 5, 4, 4], kernel_size: 7, "
          f"residual_kernel_size: 3, last_kernel_size: 7, dilation_base: 2, pad_mode: constant, true_skip: true, "
          f"compress: 2, lstm: 1, causal: false, decoder: {{trim_right_ratio: 1.0}}}}\n"
          f"rvq: {{n_q: 4, bins: {bins}}}\n")
    torch.save({"best_state": model.state_dict(), "xp.cfg": xp, "version": "1.3.0", "exported": True}, path)
    return path
