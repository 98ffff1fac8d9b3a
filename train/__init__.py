"""Training-form StemGen LM: plain, trainable PyTorch; the reference the engine is tested against.

Deliberately independent of ``stemgen.engine``: nothing here imports the engine.
"""
from .config import PRESETS, SLAKH_INSTRUMENTS, StemGenConfig, preset
from .model import StemGenLM, load_checkpoint, save_checkpoint

__all__ = ["PRESETS", "SLAKH_INSTRUMENTS", "StemGenConfig", "preset", "StemGenLM",
           "load_checkpoint", "save_checkpoint"]
