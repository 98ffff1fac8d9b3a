"""The StemGen inference engine: model directory loading, lean LM, sampler."""
from .api import Engine
from .config import LMConfig, ModelConfig, ModelFormatError, SamplingConfig

__all__ = ["Engine", "LMConfig", "ModelConfig", "ModelFormatError", "SamplingConfig"]
