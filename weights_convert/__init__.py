"""Converters from the checkpoint formats users hold to the engine's model directory."""
from .lm import convert_train_checkpoint, detect_lm_format, load_lm_source
from .writer import write_model_dir

__all__ = ["convert_train_checkpoint", "detect_lm_format", "load_lm_source", "write_model_dir"]
