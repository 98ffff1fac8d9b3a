"""Named models. 'demo' is the trained toy-band model (codec + LM) shipped inside the package,
in ``engine/demo_model/`` (see README, "The demo model"); anything else is a model directory."""
from __future__ import annotations

from pathlib import Path

from .config import ModelFormatError

DEMO_DIR = Path(__file__).with_name("demo_model")


def resolve_model(model: str | Path) -> Path:
    if str(model) == "demo":
        if not (DEMO_DIR / "config.json").is_file():
            raise ModelFormatError(f"the demo model is missing from this installation ({DEMO_DIR}); "
                                   "reinstall the package, or pass --model DIR")
        return DEMO_DIR
    return Path(model)
