"""Hot-path ops of a StemGen step. Each op has a PyTorch reference here; fast variants
(Triton on CUDA, C++ on the CPU) live beside their reference and are checked against it."""
