"""Codec checkpoints -> engine codec weights (weight norm folded, training buffers dropped).

Sources, detected from content:
  audiocraft  ``compression_state_dict.bin``: {"best_state", "xp.cfg" (YAML string), "version", "exported"}
  hf          a transformers ``EncodecModel`` folder: config.json + model.safetensors / pytorch_model.bin
  encodec     an ``encodec`` package ``.th`` state dict (the 24 kHz mono model)
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..engine.codec import CodecConfig, check_codec_weights, expected_codec_shapes
from ..engine.config import ModelFormatError, check_finite, is_model_dir
from ..engine.schema import load_json
from .formats import read
from .pickles import read_pickle

# {encoder,decoder}.{model|layers}.{i}.[block.j.|shortcut.]{conv.conv|convtr.convtr|conv}.{param}
_CONV = re.compile(r"^(encoder|decoder)\.(?:model|layers)\.(\d+)\.(?:(block\.\d+|shortcut)\.)?"
                   r"(?:conv\.conv|convtr\.convtr|conv)\.(weight_g|weight_v|weight|bias|"
                   r"parametrizations\.weight\.original0|parametrizations\.weight\.original1)$")
_LSTM = re.compile(r"^(encoder|decoder)\.(?:model|layers)\.(\d+)\.lstm\.((?:weight|bias)_(?:ih|hh)_l\d+)$")
_CODEBOOK = re.compile(r"^quantizer\.(?:vq\.)?layers\.(\d+)\.(?:_codebook|codebook)\.(\w+)$")
_DROPPED = {"inited", "cluster_size", "embed_avg"}


def fold_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """w = g * v / ||v||, the norm over every dim but 0 (torch weight_norm's default dim=0)."""
    norm = v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
    return g * v / norm


def normalise_state(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Any supported source's names -> engine names, weight norm folded."""
    if not isinstance(state, dict):
        raise ModelFormatError(f"{where}: the codec weights are a {type(state).__name__}, expected a state dict")
    out, pending = {}, {}
    for key, t in state.items():
        if not isinstance(key, str):
            raise ModelFormatError(f"{where}: state dict key {key!r} is not a tensor name")
        if not isinstance(t, torch.Tensor):
            continue
        if m := _CONV.match(key):
            part, i, sub, param = m.groups()
            name = f"{part}.{i}." + (f"{sub}." if sub else "")
            if param in ("weight_g", "parametrizations.weight.original0"):
                pending.setdefault(name, {})["g"] = t
            elif param in ("weight_v", "parametrizations.weight.original1"):
                pending.setdefault(name, {})["v"] = t
            else:
                out[name + param] = t
        elif m := _LSTM.match(key):
            out[f"{m.group(1)}.{m.group(2)}.lstm.{m.group(3)}"] = t
        elif m := _CODEBOOK.match(key):
            if m.group(2) == "embed":
                out[f"quantizer.{m.group(1)}.embed"] = t
            elif m.group(2) not in _DROPPED:
                raise ModelFormatError(f"{where}: unsupported codebook tensor {key!r}")
        elif key.startswith("quantizer.") and key.rsplit(".", 1)[-1] in _DROPPED:
            continue
        else:
            raise ModelFormatError(f"{where}: unexpected codec tensor {key!r} (not an Encodec SEANet/RVQ weight)")
    for name, gv in pending.items():
        if set(gv) != {"g", "v"}:
            half = "weight_g" if "g" not in gv else "weight_v"
            raise ModelFormatError(f"{where}: weight-normed layer {name.rstrip('.')} lacks its {half}")
        g, v = gv["g"], gv["v"]
        if g.dim() != v.dim() or g.shape[0] != v.shape[0] or g.numel() != v.shape[0]:
            raise ModelFormatError(f"{where}: weight-normed layer {name.rstrip('.')}: weight_g {list(g.shape)} does "
                                   f"not match weight_v {list(v.shape)}")
        out[name + "weight"] = fold_weight_norm(g.float(), v.float())
    return {k: v.float().contiguous() for k, v in out.items()}


def _resolve(cfg: dict, value, root: dict, depth: int = 0):
    """Resolve OmegaConf-style ``${a.b}`` interpolations left in an exported xp.cfg."""
    if isinstance(value, str) and (m := re.fullmatch(r"\$\{([\w.]+)\}", value)) and depth < 10:
        node = root
        for part in m.group(1).split("."):
            if not isinstance(node, dict) or part not in node:
                raise ModelFormatError(f"xp.cfg: cannot resolve interpolation {value}")
            node = node[part]
        return _resolve(cfg, node, root, depth + 1)
    return value


def xp_getter(root: dict, where: str):
    """get(node, key, default): a field of an xp.cfg section, interpolations resolved; a section
    that is not a mapping (a YAML list, number, tagged value) is one error naming the field."""
    def get(node, key, default=None):
        if node is None:
            return default
        if not isinstance(node, dict):
            raise ModelFormatError(f"{where}: xp.cfg: the section holding {key!r} is a {type(node).__name__}, "
                                   "expected a mapping")
        return _resolve(node, node.get(key, default), root)
    return get


def audiocraft_config(xp_cfg: str, where: str) -> CodecConfig:
    import yaml

    if not isinstance(xp_cfg, str):
        raise ModelFormatError(f"{where}: xp.cfg must be the YAML text of the training config")
    try:
        root = yaml.safe_load(xp_cfg)
    except (yaml.YAMLError, RecursionError, ValueError) as e:   # ValueError: ints past Python's digit limit
        raise ModelFormatError(f"{where}: xp.cfg is not valid YAML ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(root, dict):
        raise ModelFormatError(f"{where}: xp.cfg is not a YAML mapping")
    get = xp_getter(root, where)
    if get(root, "compression_model", "encodec") != "encodec":
        raise ModelFormatError(f"{where}: compression_model is {get(root, 'compression_model')!r}; only encodec "
                               "is supported")
    sea, rvq, enc = root.get("seanet") or {}, root.get("rvq") or {}, root.get("encodec") or {}
    if not all(isinstance(x, dict) for x in (sea, rvq, enc)) or not sea or not rvq:
        raise ModelFormatError(f"{where}: xp.cfg lacks the 'seanet' or 'rvq' section")
    if get(enc, "renormalize", False):
        raise ModelFormatError(f"{where}: renormalizing Encodec models are not supported yet")
    if get(root, "sample_rate") is None:
        raise ModelFormatError(f"{where}: xp.cfg has no sample_rate")
    dec = sea.get("decoder") or {}
    return _codec_config(where, "xp.cfg", dict(
        sample_rate=get(root, "sample_rate"), channels=get(root, "channels", 1),
        dimension=get(sea, "dimension", 128), n_filters=get(sea, "n_filters", 32),
        ratios=get(sea, "ratios", [8, 5, 4, 2]), n_residual_layers=get(sea, "n_residual_layers", 1),
        kernel_size=get(sea, "kernel_size", 7), last_kernel_size=get(sea, "last_kernel_size", 7),
        residual_kernel_size=get(sea, "residual_kernel_size", 3),
        dilation_base=get(sea, "dilation_base", 2), compress=get(sea, "compress", 2),
        lstm_layers=get(sea, "lstm", 2), causal=get(sea, "causal", get(enc, "causal", False)),
        pad_mode=get(sea, "pad_mode", "constant"), true_skip=get(sea, "true_skip", True),
        trim_right_ratio=get(dec if isinstance(dec, dict) else {}, "trim_right_ratio", 1.0),
        n_q=get(rvq, "n_q", 8), bins=get(rvq, "bins", 1024)))


def _codec_config(where: str, what: str, fields: dict) -> CodecConfig:
    """Validate a source's codec settings (types and ranges) through the one schema."""
    try:
        return CodecConfig.from_dict(fields)
    except ModelFormatError as e:
        raise ModelFormatError(f"{where}: {what}: {e}") from None


def hf_config(cfg: dict, n_q: int, where: str) -> CodecConfig:
    if not isinstance(cfg, dict):
        raise ModelFormatError(f"{where}: config.json is not a JSON object")
    if cfg.get("model_type") not in (None, "encodec"):
        raise ModelFormatError(f"{where}: config.json model_type is {cfg.get('model_type')!r}, expected 'encodec'")
    if cfg.get("normalize"):
        raise ModelFormatError(f"{where}: normalizing (48 kHz-style) Encodec models are not supported yet")
    if cfg.get("norm_type", "weight_norm") != "weight_norm":
        raise ModelFormatError(f"{where}: norm_type {cfg.get('norm_type')!r} not supported (weight_norm only)")
    dim = cfg.get("hidden_size", 128)
    if (cfg.get("codebook_dim") or dim) != dim:
        raise ModelFormatError(f"{where}: codebook_dim != hidden_size (projected codebooks) not supported")
    return _codec_config(where, "config.json", dict(
        sample_rate=cfg.get("sampling_rate", 24000), channels=cfg.get("audio_channels", 1),
        dimension=dim, n_filters=cfg.get("num_filters", 32), ratios=cfg.get("upsampling_ratios", [8, 5, 4, 2]),
        n_residual_layers=cfg.get("num_residual_layers", 1), kernel_size=cfg.get("kernel_size", 7),
        last_kernel_size=cfg.get("last_kernel_size", 7), residual_kernel_size=cfg.get("residual_kernel_size", 3),
        dilation_base=cfg.get("dilation_growth_rate", 2), compress=cfg.get("compress", 2),
        lstm_layers=cfg.get("num_lstm_layers", 2), causal=cfg.get("use_causal_conv", True),
        pad_mode=cfg.get("pad_mode", "reflect"), true_skip=not cfg.get("use_conv_shortcut", True),
        trim_right_ratio=cfg.get("trim_right_ratio", 1.0), n_q=n_q, bins=cfg.get("codebook_size", 1024)))


def encodec_th_config(state: dict[str, torch.Tensor], n_q: int, where: str) -> CodecConfig:
    """The `encodec` package ships no config with its .th files: the 24 kHz mono model's is known."""
    first = state.get("encoder.model.0.conv.conv.weight_v")
    if not isinstance(first, torch.Tensor) or first.dim() != 3:
        raise ModelFormatError(f"{where}: not an encodec package state dict (no encoder.model.0 weight)")
    if first.shape[1] != 1:
        raise ModelFormatError(f"{where}: the encodec 48 kHz stereo model (normalised, chunked) is not "
                               "supported yet; the 24 kHz mono model is")
    return _codec_config(where, "state dict", dict(sample_rate=24000, channels=1, dimension=128, n_filters=32,
                                                   ratios=[8, 5, 4, 2], causal=True, pad_mode="reflect",
                                                   true_skip=False, n_q=n_q, bins=1024))


def _n_q(state: dict) -> int:
    if not isinstance(state, dict):
        raise ModelFormatError(f"the codec weights are a {type(state).__name__}, expected a state dict")
    levels = {int(m.group(1)) for k in state if isinstance(k, str) and (m := _CODEBOOK.match(k))}
    if not levels:
        raise ModelFormatError("no quantizer codebooks (quantizer...layers.{k}...embed) in the codec weights")
    return max(levels) + 1


def _hf_weights(folder: Path) -> dict:
    st, pt = folder / "model.safetensors", folder / "pytorch_model.bin"
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(st))
        except SafetensorError as e:
            raise ModelFormatError(f"{st}: not a readable safetensors file ({e})") from None
    if pt.is_file():
        return read_pickle(pt)
    raise ModelFormatError(f"{folder}: HF Encodec folder has config.json but no model.safetensors or "
                           "pytorch_model.bin")


def is_engine(src: Path, load) -> bool:
    return is_model_dir(src)


def read_engine(src: Path, load) -> tuple[CodecConfig, dict]:
    """The codec of an engine model directory (its config checked by the schema, its file by the
    model directory's rules, every tensor against the config from the file's header before it is
    read), e.g. to pair a newly trained LM with the codec a model already ships. Its tensors carry the
    engine's names (convert_codec does not rename them)."""
    from ..engine.config import ModelConfig
    from ..engine.tensors import read_weights
    mc = ModelConfig.load(src)
    if mc.codec is None or not mc.weights.get("codec"):
        raise ModelFormatError(f"{src}: this model directory has no codec")
    cfg = CodecConfig.from_dict(mc.codec)
    return cfg, read_weights(mc.file(src, "codec"), expected_codec_shapes(cfg), "the codec config", "codec tensor",
                             "convert one with `stemgen convert --codec SRC`")


def is_hf(src: Path, load) -> bool:
    if src.is_dir() and not (src / "config.json").is_file():
        raise ModelFormatError(f"{src}: folder without config.json; a HF Encodec model folder "
                               "(e.g. facebook/encodec_32khz) holds config.json + model.safetensors")
    return src.is_dir()


def is_audiocraft(src: Path, load) -> bool:
    obj = load()
    if isinstance(obj, dict) and "pretrained" in obj and "best_state" not in obj:
        raise ModelFormatError(
            f"{src}: this compression_state_dict.bin holds no weights, only a pointer to the pretrained model "
            f"{obj['pretrained']!r}; pass that model's HF folder instead (config.json + model.safetensors, "
            f"e.g. a local copy of {obj['pretrained']})")
    return isinstance(obj, dict) and "best_state" in obj and "xp.cfg" in obj


def is_encodec(src: Path, load) -> bool:
    obj = load()
    if isinstance(obj, dict) and any(str(k).startswith("encoder.layers.") for k in obj):
        raise ModelFormatError(f"{src}: a bare HF Encodec state dict; pass its folder with config.json")
    return isinstance(obj, dict) and any(str(k).startswith("encoder.model.") for k in obj)


def read_hf(src: Path, load) -> tuple[CodecConfig, dict]:
    if not src.is_dir():
        raise ModelFormatError(f"{src}: --codec-format hf takes the model folder")
    hf_cfg = load_json(src / "config.json")
    if not isinstance(hf_cfg, dict):
        raise ModelFormatError(f"{src / 'config.json'}: not a JSON object (an HF Encodec config)")
    state = _hf_weights(src)
    return hf_config(hf_cfg, _n_q(state), str(src)), state


def read_audiocraft(src: Path, load) -> tuple[CodecConfig, dict]:
    obj = load()
    if not (isinstance(obj, dict) and "best_state" in obj and "xp.cfg" in obj):
        raise ModelFormatError(f"{src}: not an audiocraft export (needs 'best_state' and 'xp.cfg')")
    state = obj["best_state"]
    if not isinstance(state, dict):
        raise ModelFormatError(f"{src}: best_state is a {type(state).__name__}, expected a state dict")
    state = state.get("model", state) if isinstance(state.get("model"), dict) else state
    return audiocraft_config(obj["xp.cfg"], str(src)), state


def read_encodec(src: Path, load) -> tuple[CodecConfig, dict]:
    state = load()
    if not isinstance(state, dict):
        raise ModelFormatError(f"{src}: not a state dict")
    return encodec_th_config(state, _n_q(state), str(src)), state


def convert_codec(src: str | Path, fmt: str | None = None) -> tuple[CodecConfig, dict[str, torch.Tensor]]:
    """-> (engine codec config, engine codec tensors), validated against the config. ``fmt`` one of
    the codec formats of weights_convert.formats (detected from the content if None)."""
    where = str(src)
    if fmt in (None, "engine") and isinstance(src, (str, Path)) and is_engine(Path(src), None):
        cfg, weights = read_engine(Path(src), None)   # engine names already
    else:
        cfg, state = read("codec", src, fmt)
        weights = normalise_state(state, where)
    check_codec_weights(weights, expected_codec_shapes(cfg), where)
    check_finite(weights, where, "codec tensor")
    return cfg, weights


def load_codec_any(src: str | Path):
    """A ready engine ``Codec`` from an engine model directory or any convertible codec source,
    with a fingerprint of its weights (keys token caches to the codec that made them)."""
    import hashlib

    from ..engine.codec import Codec

    cfg, weights = convert_codec(src)   # an engine model directory's codec, or any convertible source
    codec = Codec(cfg, {k: v.float() for k, v in weights.items()})
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    for k in sorted(codec.w):
        h.update(k.encode())
        h.update(codec.w[k].detach().float().contiguous().numpy().tobytes())
    return codec, h.hexdigest()[:16]
