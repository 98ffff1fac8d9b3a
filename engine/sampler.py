"""Level-by-level iterative masked decoding (SPEC section 4) for one request: the scheduler
with a batch of one. See engine.scheduler for the step itself."""
from __future__ import annotations

from typing import Callable

import torch

from .config import SamplingConfig
from .scheduler import Request, guidance_rows, masked_after_step, run_requests  # noqa: F401 (re-exported)


def generate_tokens(model, context: torch.Tensor, conditions: torch.Tensor, sampling: SamplingConfig,
                    target: torch.Tensor | None = None,
                    progress: Callable[[int, int, int], None] | None = None) -> torch.Tensor:
    """context [C-1, Q, T] codes, conditions [S] ids -> target tokens [Q, T].

    ``target`` (optional) holds fixed codes and MASK where to generate (inpainting/continuation).
    ``progress(level, step, n_steps)`` is called after every step."""
    return run_requests(model, [Request(model.cfg, context, conditions, sampling, target=target, progress=progress)])[0]
