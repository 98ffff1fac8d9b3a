"""audiocraft MAGNeT LM checkpoints (``state_dict.bin``: {"best_state", "xp.cfg" (YAML string),
"version", "exported"}) -> engine MAGNeT weights (engine.magnet; SPEC section 9).

Every source tensor is consumed and every engine tensor filled: a leftover or missing key is an
error naming it. The T5 text encoder is not in the checkpoint: `stemgen convert --text-encoder`
takes the user's local HF folder (t5-base for the music models) and stores its encoder in the
model directory (engine.text)."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..engine.config import MagnetConfig, ModelFormatError, check_finite, check_shapes
from ..engine.magnet import magnet_shapes
from .codec import xp_getter

# what the engine's MAGNeT architecture is: the checkpoint's transformer_lm must say the same
REQUIRED = {"norm_first": True, "bias_ff": False, "bias_attn": False, "bias_proj": False, "activation": "gelu",
            "norm": "layer_norm", "positional_embedding": "sin", "qk_layer_norm": False,
            "qk_layer_norm_cross": False, "layer_scale": None, "kv_repeat": 1, "causal": False}


def _yaml(xp_cfg, where: str) -> dict:
    import yaml

    if not isinstance(xp_cfg, str):
        raise ModelFormatError(f"{where}: xp.cfg must be the YAML text of the training config")
    try:
        root = yaml.safe_load(xp_cfg)
    except (yaml.YAMLError, RecursionError, ValueError) as e:
        raise ModelFormatError(f"{where}: xp.cfg is not valid YAML ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(root, dict):
        raise ModelFormatError(f"{where}: xp.cfg is not a YAML mapping")
    return root


def is_magnet(path: Path, load) -> bool:
    """Detector: an audiocraft LM export whose xp.cfg says lm_model transformer_lm_magnet. A MusicGen
    (autoregressive) export is refused here with its own line."""
    if path.is_dir():
        return False
    obj = load()
    if not (isinstance(obj, dict) and "best_state" in obj and "xp.cfg" in obj):
        return False
    root = _yaml(obj["xp.cfg"], str(path))
    kind = root.get("lm_model")
    if kind == "transformer_lm_magnet":
        return True
    if kind == "transformer_lm":
        raise ModelFormatError(f"{path}: a MusicGen (autoregressive) LM: MusicGen is not supported; MAGNeT is "
                               "(facebook/magnet-* state_dict.bin)")
    if "transformer_lm" in root or kind is not None:
        raise ModelFormatError(f"{path}: an audiocraft export of lm_model {str(kind)[:40]!r}; only MAGNeT "
                               "(transformer_lm_magnet) is supported")
    return False


def magnet_config(root: dict, where: str) -> tuple[MagnetConfig, str]:
    """xp.cfg -> (the engine config, the T5 model name). Its generate.lm section is the training solver's
    evaluation setting, which audiocraft's MAGNeT API does not use: the engine's defaults are the API's
    (MAGNeT.set_generation_params; engine.config.magnet_sampling_defaults)."""
    lm = root.get("transformer_lm")
    if not isinstance(lm, dict):
        raise ModelFormatError(f"{where}: xp.cfg has no transformer_lm section")
    get = xp_getter(root, where)
    for key, want in REQUIRED.items():
        got = get(lm, key, want)
        if got != want:
            raise ModelFormatError(f"{where}: transformer_lm.{key} is {str(got)[:40]!r}; the engine's MAGNeT "
                                   f"needs {want!r} (the released MAGNeT checkpoints' value)")
    cond = get(root, "conditioners") or {}
    desc = cond.get("description") if isinstance(cond, dict) else None
    if not isinstance(desc, dict) or get(desc, "model") != "t5":
        raise ModelFormatError(f"{where}: xp.cfg's conditioners.description is not a T5 text conditioner; only "
                               "text-conditioned MAGNeT models are supported")
    t5 = get(desc, "t5") or {}
    t5_name = get(t5, "name", "t5-base")
    if not isinstance(t5_name, str) or not 0 < len(t5_name) <= 200 or not t5_name.isprintable():
        raise ModelFormatError(f"{where}: xp.cfg conditioners.description.t5.name {repr(t5_name)[:40]} is not a "
                               "model name such as t5-base")
    if get(t5, "normalize_text", False):
        raise ModelFormatError(f"{where}: conditioners.description.t5.normalize_text is set (spaCy text "
                               "normalisation); not supported")
    masking = get(root, "masking") or {}
    dataset = get(root, "dataset") or {}
    # as audiocraft's loader (load_lm_model_magnet): the dataset's segment, 50 frames/s, masking's span
    seconds = get(dataset, "segment_duration", 10)
    rate = 50
    dim, scale = get(lm, "dim"), get(lm, "hidden_scale", 4)

    def number(v, what):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ModelFormatError(f"{where}: xp.cfg {what} must be a number, got {str(v)[:40]!r}")
        return v

    try:
        ffn = int(number(scale, "transformer_lm.hidden_scale") * number(dim, "transformer_lm.dim"))
        segment = int(round(number(seconds, "segment_duration") * number(rate, "compression_model_framerate")))
    except OverflowError:
        raise ModelFormatError(f"{where}: xp.cfg sizes are out of range") from None
    doc = {"d_model": dim, "n_heads": get(lm, "num_heads"), "n_layers": get(lm, "num_layers"), "n_q": get(lm, "n_q"),
           "codebook_size": get(lm, "card"), "ffn_hidden": ffn, "text_dim": 1, "arch": "magnet",
           "band": get(lm, "subcodes_context", 5), "segment_frames": segment,
           "span_len": get(masking, "span_len", 3)}
    try:
        cfg = MagnetConfig.from_dict(doc)   # the schema: types and ranges
    except ModelFormatError as e:
        text = str(e)
        for ours, theirs in XP_NAMES.items():
            text = text.replace(f"lm config.{ours}:", f"xp.cfg {theirs}:")
        raise ModelFormatError(f"{where}: {text}") from None
    return cfg, t5_name


# engine config field -> the xp.cfg field it comes from (for error messages)
XP_NAMES = {"d_model": "transformer_lm.dim", "n_heads": "transformer_lm.num_heads",
            "n_layers": "transformer_lm.num_layers", "n_q": "transformer_lm.n_q", "codebook_size": "transformer_lm.card",
            "ffn_hidden": "transformer_lm.hidden_scale x dim", "band": "transformer_lm.subcodes_context",
            "segment_frames": "dataset.segment_duration x 50", "span_len": "masking.span_len"}
_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.(.+)$")
_PER_LAYER = {"self_attn.in_proj_weight": "wqkv", "self_attn.out_proj.weight": "wo",
              "cross_attention.out_proj.weight": "cross_wo", "linear1.weight": "w1", "linear2.weight": "w2",
              "norm1.weight": "norm1_w", "norm1.bias": "norm1_b", "norm_cross.weight": "norm_cross_w",
              "norm_cross.bias": "norm_cross_b", "norm2.weight": "norm2_w", "norm2.bias": "norm2_b"}
PROJ = "condition_provider.conditioners.description.output_proj."


def map_state(cfg: MagnetConfig, state: dict, where: str) -> dict[str, torch.Tensor]:
    """audiocraft names -> engine names (fp32): every source key used once, every engine tensor
    filled; errors name the key."""
    if not isinstance(state, dict):
        raise ModelFormatError(f"{where}: best_state is a {type(state).__name__}, expected a state dict")
    d = cfg.d_model
    out, used, emb, heads = {}, set(), {}, {}
    for key, t in state.items():
        if not isinstance(key, str) or not isinstance(t, torch.Tensor):
            raise ModelFormatError(f"{where}: best_state entry {str(key)[:60]!r} is not a named tensor")
        if not t.is_floating_point():
            raise ModelFormatError(f"{where}: tensor {key!r} has dtype {t.dtype}, expected a float type")
        t = t.float()
        if m := re.fullmatch(r"emb\.(\d+)\.weight", key):
            emb[int(m.group(1))] = t
        elif m := re.fullmatch(r"linears\.(\d+)\.weight", key):
            heads[int(m.group(1))] = t
        elif key in ("out_norm.weight", "out_norm.bias"):
            out["out_norm_" + key.rsplit(".", 1)[1][0]] = t
        elif key.startswith(PROJ) and key[len(PROJ):] in ("weight", "bias"):
            out["text_proj_" + key[len(PROJ)]] = t
        elif (m := _LAYER.match(key)) and m.group(2) in _PER_LAYER:
            out[f"layers.{m.group(1)}.{_PER_LAYER[m.group(2)]}"] = t
        elif m and m.group(2) == "cross_attention.in_proj_weight":
            if t.dim() != 2 or t.shape[0] != 3 * d:
                raise ModelFormatError(f"{where}: tensor {key!r} has shape {list(t.shape)}, expected [{3 * d}, {d}]")
            out[f"layers.{m.group(1)}.cross_wq"], out[f"layers.{m.group(1)}.cross_wkv"] = t[:d], t[d:]
        else:
            raise ModelFormatError(f"{where}: unexpected tensor {key!r}: not part of a MAGNeT LM as this engine "
                                   "runs it (a bias, qk-norm or other module it does not implement)")
        used.add(key)
    for name, parts, n in (("tok_emb", emb, cfg.n_q), ("heads", heads, cfg.n_q)):
        what = "emb" if name == "tok_emb" else "linears"
        missing = [k for k in range(n) if k not in parts]
        if missing or len(parts) != n:
            bad = missing[0] if missing else max(parts)
            raise ModelFormatError(f"{where}: {'missing' if missing else 'unexpected'} tensor '{what}.{bad}.weight' "
                                   f"(the config has n_q = {n})")
        shapes = {tuple(parts[k].shape) for k in range(n)}
        if len(shapes) != 1:
            raise ModelFormatError(f"{where}: the {what}.* tensors differ in shape: {sorted(shapes)}")
        out[name] = torch.cat([parts[k] for k in range(n)]) if name == "tok_emb" else \
            torch.stack([parts[k] for k in range(n)])
    if "text_proj_w" in out and out["text_proj_w"].dim() == 2:
        cfg_text = out["text_proj_w"].shape[1]
    else:
        raise ModelFormatError(f"{where}: missing tensor '{PROJ}weight' (the text conditioner's output projection)")
    expected = magnet_shapes(MagnetConfig(**{**cfg.to_dict(), "text_dim": cfg_text}))
    missing = [k for k in expected if k not in out]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelFormatError(f"{where}: missing tensor {source_name(missing[0])!r}{more} (the checkpoint's xp.cfg "
                               f"has {cfg.n_layers} layers)")
    check_shapes({k: tuple(v.shape) for k, v in out.items()}, expected, where, "the checkpoint's xp.cfg")
    check_finite(out, where)
    return out


def source_name(engine_name: str) -> str:
    """The audiocraft key an engine tensor comes from (for error messages)."""
    layer, _, name = engine_name.partition(".")[2].partition(".")
    for src, dst in _PER_LAYER.items():
        if dst == name:
            return f"transformer.layers.{layer}.{src}"
    if name in ("cross_wq", "cross_wkv"):
        return f"transformer.layers.{layer}.cross_attention.in_proj_weight"
    return engine_name


def read_magnet(path: Path, load):
    """Reader of the "magnet" format -> (MagnetConfig, engine state, {"sampling": ..., "t5": name})."""
    ck = load()
    where = str(path)
    cfg, t5_name = magnet_config(_yaml(ck.get("xp.cfg"), where), where)
    state = map_state(cfg, ck.get("best_state"), where)
    cfg = MagnetConfig(**{**cfg.to_dict(), "text_dim": state["text_proj_w"].shape[1]})
    return cfg, state, {"t5": t5_name}


def convert_magnet(source, out: Path, codec: Path | None, codec_format: str | None, text_encoder: Path | None,
                   dtype: torch.dtype = torch.float32, force: bool = False) -> Path:
    """`stemgen convert` for a MAGNeT checkpoint: LM + codec + the T5 encoder -> one model directory."""
    from ..engine.config import CODEC_WEIGHTS, LM_WEIGHTS, ModelConfig
    from ..engine.text import TEXT_ENCODER_DIR, read_t5_folder, save_t5_encoder
    from .codec import convert_codec
    from .formats import read
    from .pickles import pickle_file

    path = pickle_file(source).path
    if text_encoder is None:
        raise ModelFormatError(f"{path} is a MAGNeT checkpoint: pass its T5 text encoder with --text-encoder "
                               "T5_FOLDER (a local copy of the t5-base folder; it is not in the checkpoint)")
    cfg, state, meta = read("lm", source, "magnet")
    t5, _ = read_t5_folder(text_encoder)
    if int(t5.config.d_model) != cfg.text_dim:
        raise ModelFormatError(f"{text_encoder}: the T5 encoder's width is {t5.config.d_model}, but the checkpoint's "
                               f"text projection takes {cfg.text_dim} ({meta['t5']} was trained with it): pass the "
                               f"{meta['t5']} folder")
    del t5
    weights, codec_cfg = {"lm": {k: v.to(dtype) for k, v in state.items()}}, None
    if codec is not None:
        codec_cfg, weights["codec"] = convert_codec(codec, codec_format)
        if codec_cfg.bins != cfg.codebook_size or codec_cfg.n_q < cfg.n_q:
            raise ModelFormatError(f"codec ({codec_cfg.n_q} levels x {codec_cfg.bins} codes) does not fit the "
                                   f"LM ({cfg.n_q} levels x {cfg.codebook_size} codes)")
    from ..engine.config import magnet_sampling_defaults
    config = ModelConfig(lm=cfg, instruments=[], sampling=magnet_sampling_defaults(),
                         dtype=str(dtype).split(".")[-1], codec=codec_cfg.to_dict() if codec_cfg else None,
                         weights={"lm": LM_WEIGHTS, "codec": CODEC_WEIGHTS if codec_cfg else None,
                                  "text_encoder": TEXT_ENCODER_DIR},
                         window=cfg.segment_frames)
    from .writer import write_model_dir
    return write_model_dir(out, config, weights, overwrite=force,
                           extra=lambda tmp: save_t5_encoder(text_encoder, tmp / TEXT_ENCODER_DIR))
