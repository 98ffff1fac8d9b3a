"""Converters from the checkpoint formats users hold to the engine's model directory. The names
below load on first use, so `weights_convert.formats` (the CLI's help) stays light."""
import importlib

_NAMES = {"FORMATS": ".formats", "detect": ".formats", "convert_train_checkpoint": ".lm",
          "load_lm_source": ".lm", "write_model_dir": ".writer"}
__all__ = list(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
