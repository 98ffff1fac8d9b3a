"""Named models. 'demo' is the trained toy-band model (codec + LM) shipped inside the package,
in ``engine/demo_model/`` (see README, "The demo model"); anything else is a model directory."""
from __future__ import annotations

import os
import re
from pathlib import Path

from .config import ModelFormatError

DEMO_DIR = Path(__file__).with_name("demo_model")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def cache_root() -> Path:
    """stemgen's cache: $STEMGEN_CACHE, else $XDG_CACHE_HOME/stemgen or ~/.cache/stemgen."""
    if os.environ.get("STEMGEN_CACHE"):
        return Path(os.environ["STEMGEN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stemgen"


def hub_model_dir(repo_id: str) -> Path:
    """Where `stemgen convert --from-hf-cache REPO` puts its engine model directory."""
    return cache_root() / "hf" / repo_id.replace("/", "--")


def resolve_model(model: str | Path) -> Path:
    """'demo', a model directory, or a Hugging Face repo id converted once with
    `stemgen convert --from-hf-cache REPO` (e.g. facebook/magnet-small-10secs)."""
    if str(model) == "demo":
        if not (DEMO_DIR / "config.json").is_file():
            raise ModelFormatError(f"the demo model is missing from this installation ({DEMO_DIR}); "
                                   "reinstall the package, or pass --model DIR")
        return DEMO_DIR
    path = Path(model)
    if not path.exists() and HUB_ID.fullmatch(str(model)):
        converted = hub_model_dir(str(model))
        if (converted / "config.json").is_file():
            return converted
        raise ModelFormatError(f"{model}: no such model directory, and not converted from the Hugging Face cache "
                               f"yet: run `stemgen convert --from-hf-cache {model}` once")
    return path
