"""LM checkpoint -> engine weights. Source format today: the training checkpoint of
``stemgen.train`` (``torch.save`` of {"format": "stemgen-train", "config": ..., "model": ...})."""
from __future__ import annotations

from pathlib import Path

import torch

from ..engine.config import LMConfig, ModelFormatError, check_finite, check_shapes
from ..train.config import StemGenConfig
from ..train.model import StemGenLM
from .formats import read
from .pickles import PickleFile, pickle_file

def is_train(path: Path, load) -> bool:
    """Detector of the "train" format (weights_convert.formats)."""
    if path.is_dir():
        raise ModelFormatError(f"{path}: is a directory; --lm takes a checkpoint file")
    obj = load()
    return isinstance(obj, dict) and "config" in obj and "model" in obj


def load_lm_source(path: str | Path | PickleFile, fmt: str | None = None) -> tuple[StemGenConfig, dict[str, torch.Tensor]]:
    """Read and validate a source LM checkpoint (format ``fmt``, detected if None): its config and
    state dict."""
    return read("lm", path, fmt)


def read_train(path: Path, load) -> tuple[StemGenConfig, dict[str, torch.Tensor]]:
    """Reader of the "train" format: config validated by the schema, tensors by shape and value."""
    ck = load()
    if not (isinstance(ck, dict) and isinstance(ck.get("config"), dict) and isinstance(ck.get("model"), dict)):
        raise ModelFormatError(f"{path}: not a training checkpoint (needs dict keys 'config' and 'model')")
    from ..engine.schema import TRAIN_SPEC, check
    try:
        cfg = StemGenConfig.from_dict(check(ck["config"], TRAIN_SPEC, f"{path}: config"))
    except (TypeError, ValueError) as e:
        raise ModelFormatError(f"{path}: config: {e}") from None
    state = ck["model"]
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in StemGenLM(cfg).state_dict().items()}
    bad = [k for k, t in state.items() if not isinstance(t, torch.Tensor)]
    if bad:
        raise ModelFormatError(f"{path}: entry {bad[0]!r} is not a tensor")
    check_shapes({k: t.shape for k, t in state.items()}, expected, str(path), "the checkpoint's config")
    for k in expected:
        t = state[k]
        if not t.is_floating_point():
            raise ModelFormatError(f"{path}: tensor {k!r} has dtype {t.dtype}, expected a float type")
    check_finite(state, str(path))
    return cfg, state


def engine_lm_config(cfg: StemGenConfig) -> LMConfig:
    return LMConfig(d_model=cfg.d_model, n_heads=cfg.n_heads, n_layers=cfg.n_layers, n_q=cfg.n_q,
                    codebook_size=cfg.codebook_size, n_channels=cfg.n_channels,
                    cond_sizes=tuple(cfg.cond_sizes), ffn_hidden=cfg.ffn_hidden,
                    rope_theta=cfg.rope_theta, norm_eps=cfg.norm_eps)


def convert_train_state(cfg: StemGenConfig, state: dict[str, torch.Tensor],
                        dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Training state dict -> engine tensors (flat tables, fused QKV and gate/up)."""
    s = {k: v.to(dtype) for k, v in state.items()}
    out = {
        "tok_emb": torch.cat([s[f"level_emb.{q}.weight"] for q in range(cfg.n_q)]),
        "cond_emb": torch.cat([s[f"cond_emb.{i}.weight"] for i in range(len(cfg.cond_sizes))]),
        "norm": s["norm.weight"],
        "heads": torch.stack([s[f"heads.{q}.weight"] for q in range(cfg.n_q)]),
    }
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        out[p + "attn_norm"] = s[p + "attn_norm.weight"]
        out[p + "wqkv"] = torch.cat([s[p + f"attn.{w}.weight"] for w in ("wq", "wk", "wv")])
        out[p + "wo"] = s[p + "attn.wo.weight"]
        out[p + "ffn_norm"] = s[p + "ffn_norm.weight"]
        out[p + "w13"] = torch.cat([s[p + "ffn.w1.weight"], s[p + "ffn.w3.weight"]])
        out[p + "w2"] = s[p + "ffn.w2.weight"]
    return out


def convert_train_checkpoint(path: str | Path | PickleFile, fmt: str | None = None,
                             dtype: torch.dtype = torch.float32):
    """-> (LMConfig, instrument names, engine LM tensors)."""
    cfg, state = load_lm_source(path, fmt)
    return engine_lm_config(cfg), list(cfg.instruments), convert_train_state(cfg, state, dtype)


def train_state_from_engine(cfg: StemGenConfig, engine: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``convert_train_state``: engine tensors -> training-form state dict (used by
    `stemgen bench` to run the baseline on a converted model's own weights)."""
    Q, d, h = cfg.n_q, cfg.d_model, cfg.ffn_hidden
    out = {f"level_emb.{q}.weight": t for q, t in enumerate(engine["tok_emb"].float().chunk(Q))}
    out.update({f"cond_emb.{i}.weight": t for i, t in
                enumerate(engine["cond_emb"].float().split([n + 1 for n in cfg.cond_sizes]))})
    out["norm.weight"] = engine["norm"].float()
    out.update({f"heads.{q}.weight": engine["heads"][q].float() for q in range(Q)})
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        wq, wk, wv = engine[p + "wqkv"].float().split(d)
        w1, w3 = engine[p + "w13"].float().split(h)
        out.update({p + "attn_norm.weight": engine[p + "attn_norm"].float(), p + "attn.wq.weight": wq,
                    p + "attn.wk.weight": wk, p + "attn.wv.weight": wv, p + "attn.wo.weight": engine[p + "wo"].float(),
                    p + "ffn_norm.weight": engine[p + "ffn_norm"].float(), p + "ffn.w1.weight": w1,
                    p + "ffn.w3.weight": w3, p + "ffn.w2.weight": engine[p + "w2"].float()})
    return out


def training_window(path: str | Path | PickleFile) -> int | None:
    """The crop length (frames) a `stemgen train` checkpoint was trained on, if it says: the engine
    generates longer contexts window by window."""
    ck = pickle_file(path).load()
    frames = (ck.get("train_config") or {}).get("frames") if isinstance(ck, dict) else None
    return frames if isinstance(frames, int) and not isinstance(frames, bool) and 8 <= frames <= 1 << 20 else None
