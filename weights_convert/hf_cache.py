"""`stemgen convert --from-hf-cache REPO`: a MAGNeT checkpoint that audiocraft already downloaded,
found offline in the Hugging Face cache through huggingface_hub's own cache API (nothing is
downloaded), converted once into stemgen's cache (engine.models.hub_model_dir).

A MAGNeT repo (facebook/magnet-small-10secs, ...) holds state_dict.bin (the LM) and a
compression_state_dict.bin that names its codec (facebook/encodec_32khz) instead of holding it; the
T5 encoder is the one its xp.cfg names (t5-base, cached as google-t5/t5-base or t5-base)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..engine.config import ModelFormatError
from ..engine.models import hub_model_dir
from .pickles import PickleFile


def cached_folder(repo_ids: list[str], what: str, needed: str) -> Path:
    """The cached snapshot of the first of ``repo_ids`` that is in the HF cache (offline)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise ModelFormatError("--from-hf-cache needs huggingface_hub: pip install -e '.[magnet]'") from None
    for repo in repo_ids:
        try:
            return Path(snapshot_download(repo, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError):
            continue
    raise ModelFormatError(f"{what} ({' or '.join(repo_ids)}) is not in the Hugging Face cache; on a machine with "
                           f"internet: huggingface-cli download {repo_ids[0]} ({needed}), or pass the files to "
                           "`stemgen convert` directly")


def t5_repos(name: str) -> list[str]:
    return [name] if "/" in name else [f"google-t5/{name}", name]


def convert_from_hf_cache(repo_id: str, out: Path | None = None, dtype: torch.dtype = torch.float32,
                          force: bool = False) -> Path:
    from .formats import read
    from .magnet import convert_magnet

    lm_dir = cached_folder([repo_id], f"the MAGNeT checkpoint {repo_id}", "state_dict.bin")
    lm = lm_dir / "state_dict.bin"
    if not lm.is_file():
        raise ModelFormatError(f"{lm_dir}: no state_dict.bin in the cached {repo_id}")
    source = PickleFile(lm)
    _, _, meta = read("lm", source, "magnet")
    codec_name = "facebook/encodec_32khz"
    pointer = lm_dir / "compression_state_dict.bin"
    if pointer.is_file():
        ck = PickleFile(pointer).load()
        if isinstance(ck, dict) and isinstance(ck.get("pretrained"), str):
            codec_name = ck["pretrained"]
    codec = cached_folder([codec_name], f"the codec {codec_name}", "config.json, model.safetensors")
    t5 = cached_folder(t5_repos(meta["t5"]), f"the text encoder {meta['t5']}", "config.json, model.safetensors, "
                       "tokenizer files")
    if out is None:
        out = hub_model_dir(repo_id)
        out.parent.mkdir(parents=True, exist_ok=True)
    return convert_magnet(source, out, codec, "hf", t5, dtype, force)
