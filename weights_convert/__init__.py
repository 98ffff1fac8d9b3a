"""Converters from the checkpoint formats users hold to the engine's model directory."""
from .formats import FORMATS, detect
from .lm import convert_train_checkpoint, load_lm_source
from .writer import write_model_dir

__all__ = ["FORMATS", "convert_train_checkpoint", "detect", "load_lm_source", "write_model_dir"]
