"""MAGNeT's text encoder: a T5 encoder and its tokenizer through ``transformers`` (a kept library;
installed with the ``magnet`` extra), from a local folder only: nothing is downloaded, no code from
the folder runs (safetensors weights; ``trust_remote_code`` off).

A prompt is tokenised alone (its own tokens, no padding) and encoded once per request, outside the
step loop; the LM's output projection turns the result into the request's memory
(engine.magnet.MagnetLM.project_text). audiocraft batches prompts padded to the longest, and its
cross-attention has no key-padding mask, so there a prompt's output depends on the other prompts
in its batch; here it never does.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .errors import ModelFormatError, RequestError

log = logging.getLogger("stemgen")

TEXT_ENCODER_DIR = "text_encoder"     # inside a model directory
MAX_PROMPT_CHARS = 4096


def _hide_source_tree() -> None:
    """Run from a source checkout's root (``python -m stemgen``), the checkout's ``kernels/`` folder
    is importable as a top-level module and transformers mistakes it for the ``kernels`` package it
    probes for; drop that path entry (the project is imported as ``stemgen``)."""
    import os
    import sys

    here = Path(__file__).resolve().parent.parent      # the source tree's root (engine/ lives in it)
    if (here / "kernels" / "registry.py").is_file():
        sys.path[:] = [p for p in sys.path if Path(os.path.abspath(p or os.curdir)) != here]


def _transformers():
    _hide_source_tree()
    try:
        import transformers
    except ImportError:
        raise ModelFormatError("MAGNeT models need the `transformers` package for their T5 text encoder: "
                               "pip install -e '.[magnet]'") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def read_t5_folder(folder: str | Path):
    """(T5EncoderModel in fp32, tokenizer) from a local HF folder; one clear error otherwise."""
    folder = Path(folder)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ModelFormatError(f"{folder}: not a Hugging Face model folder (config.json missing); pass the local "
                               "t5-base folder (its config.json, model.safetensors and tokenizer files)")
    tf = _transformers()
    try:
        config = tf.AutoConfig.from_pretrained(folder, local_files_only=True)
        if getattr(config, "model_type", None) not in ("t5", "mt5"):   # umt5's per-layer position bias: not T5's
            raise ModelFormatError(f"{folder}: model_type {getattr(config, 'model_type', None)!r} is not a T5 "
                                   "encoder; pass the t5-base (or t5-large) folder")
        _check_sizes(folder, config)
        tokenizer = tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = tf.T5EncoderModel.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32,
                                                  use_safetensors=True)
    except ModelFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers' own validation errors vary by version: one line each
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFormatError(f"{folder}: cannot load the T5 encoder or its tokenizer: {first[:200]}") from None
    return model.eval().requires_grad_(False), tokenizer


def _encoder_parameters(c) -> int:
    """The parameter count of the T5 encoder a config describes (embedding, per block q/k/v/o, the
    feed-forward (gated: three matrices), two norms; the relative position bias; the final norm)."""
    d, ff, inner = c.d_model, c.d_ff, c.num_heads * c.d_kv
    block = 4 * d * inner + (3 if getattr(c, "is_gated_act", False) else 2) * d * ff + 2 * d
    return c.vocab_size * d + c.num_layers * block + d + c.relative_attention_num_buckets * c.num_heads


def _check_sizes(folder: Path, config) -> None:
    """The folder's config.json against bounds and against the safetensors weights transformers will
    load: transformers would otherwise build (and randomly initialise) every layer the
    config names, so a config claiming 200,000 layers over a 2-layer file allocated without bound."""
    from .schema import T5_SPEC, check
    check({k: getattr(config, k, None) for k in T5_SPEC}, T5_SPEC, f"{folder}/config.json")
    # transformers fills what the files lack with random values at the config's sizes: the config may
    # describe no more values than the files it loads hold (counted from their headers), and as many
    # encoder blocks as they hold
    values, blocks = _stored_weights(folder)
    if len(blocks) != config.num_layers:
        raise ModelFormatError(f"{folder}: config.json says {config.num_layers} encoder layers, the weights hold "
                               f"{len(blocks)}; the folder's config and weights do not match")
    need = _encoder_parameters(config)
    if need > 1.01 * values + 4096:
        raise ModelFormatError(f"{folder}: config.json describes a T5 encoder of {need / 1e6:.1f}M parameters, its "
                               f"weights hold {values / 1e6:.1f}M values; the config and weights do not match")


def _stored_weights(folder: Path) -> tuple[int, set]:
    """(values, encoder block numbers) of the safetensors files transformers loads from ``folder``:
    model.safetensors, else the shards its index names; read from the headers only."""
    import math

    from safetensors import SafetensorError, safe_open

    from .schema import load_json
    files = [folder / "model.safetensors"]
    if not files[0].is_file():
        index = folder / "model.safetensors.index.json"
        if not index.is_file():
            raise ModelFormatError(f"{folder}: no model.safetensors (nor sharded safetensors with their index); the "
                                   "T5 encoder is read from safetensors only: save it with safe_serialization=True")
        doc = load_json(index)
        shards = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(shards, dict) or not all(isinstance(n, str) and "/" not in n for n in shards.values()):
            raise ModelFormatError(f"{index}: weight_map must map tensor names to shard file names in the folder")
        files = [folder / n for n in sorted(set(shards.values()))]
    values, blocks = 0, set()
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    values += math.prod(f.get_slice(name).get_shape())
                    if name.startswith("encoder.block.") and name.count(".") > 2:
                        blocks.add(name.split(".")[2])
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelFormatError(f"{path}: not a readable safetensors file ({str(e)[:120]})") from None
    return values, blocks


class TextEncoder:
    """Prompt -> T5 encoder output [L, width] (fp32, on the CPU or the model's device)."""

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu"):
        self.model, self.tokenizer = read_t5_folder(folder)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.width = int(self.model.config.d_model)
        self.max_tokens = int(min(getattr(self.tokenizer, "model_max_length", 512) or 512, 4096))

    def check(self, prompt) -> str:
        if not isinstance(prompt, str):
            raise RequestError(f"a text prompt must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise RequestError("the text prompt is empty; describe the music, e.g. --text \"90s rock with heavy drums\"")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise RequestError(f"the text prompt is {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
        return prompt

    def tokens(self, prompt: str) -> torch.Tensor:
        ids = self.tokenizer(self.check(prompt), return_tensors="pt")["input_ids"]
        if ids.shape[1] > self.max_tokens:
            raise RequestError(f"the text prompt is {ids.shape[1]} tokens; the T5 encoder takes at most "
                               f"{self.max_tokens}: shorten it")
        return ids

    @torch.inference_mode()
    def encode(self, prompt: str) -> torch.Tensor:
        ids = self.tokens(prompt).to(self.device)
        return self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0].float()


def save_t5_encoder(src: str | Path, out: Path) -> int:
    """The encoder half of a T5 folder, with its tokenizer, as safetensors in ``out``; -> its width."""
    model, tokenizer = read_t5_folder(src)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return int(model.config.d_model)
