"""Hot-path ops of a StemGen step, one module per op: the PyTorch reference and the registration
of its fast variants (C++ on the CPU, Triton on CUDA; the Triton code in <op>_triton.py beside
it). `OPS` is the table every other part reads (kernels.registry)."""
# each module registers its op; this order (the order of a step) is the order `stemgen info` shows
from . import embedding, attention, norm, swiglu, guidance_fold, sampling  # noqa: F401, I001
# MAGNeT's ops (engine.magnet)
from . import layer_norm, band_attention, cross_attention, gelu, magnet_sampling  # noqa: F401, I001
# the trunk's GEMMs on the CPU: fp32 (oneDNN, packed weights) and --dtype int8
from . import linear, int8_linear  # noqa: F401, I001
from .registry import OPS  # noqa: F401
