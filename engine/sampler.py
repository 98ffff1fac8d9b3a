"""Level-by-level iterative masked decoding (SPEC section 4) for one request: the scheduler
with a batch of one. See engine.scheduler for the step itself."""
from __future__ import annotations

from typing import Callable

import torch

from .config import SamplingConfig
from .scheduler import Request, Scheduler, guidance_rows, masked_after_step  # noqa: F401 (re-exported)


def generate_tokens(model, context: torch.Tensor, conditions: torch.Tensor, sampling: SamplingConfig,
                    target: torch.Tensor | None = None,
                    progress: Callable[[int, int, int], None] | None = None) -> torch.Tensor:
    """context [C-1, Q, T] codes, conditions [S] ids -> target tokens [Q, T].

    ``target`` (optional) holds fixed codes and MASK where to generate (inpainting/continuation).
    ``progress(level, step, n_steps)`` is called after every step."""
    req = Request(model.cfg, context, conditions, sampling, target=target, progress=progress)
    sched = Scheduler(model)
    sched.submit(req)
    sched.run()
    return req.tokens
