"""pytest-benchmark groups for whole generations at CI size: engine vs the fp32 training-form
baseline (see stemgen.bench), same process. Run: pytest bench/ [--benchmark-json out.json].
Use `stemgen bench` for the full-size figures."""
import pytest
import torch

from stemgen.bench import baseline_generate, build_models, engine_generate
from stemgen.engine.config import SamplingConfig
from stemgen.engine.model import default_dtype

STEPS = (4, 2, 2, 2)
T = 100


@pytest.fixture(scope="module")
def models():
    cpu = torch.device("cpu")
    lm, base, _, _ = build_models(None, "tiny", cpu, default_dtype(cpu), True, seed=0)
    return lm, base


def inputs(B):
    g = torch.Generator().manual_seed(B)
    ctx = torch.randint(0, 64, (B, 1, 4, T), generator=g)
    cond = torch.randint(0, 17, (B, 1), generator=g)
    return ctx, cond, [SamplingConfig(steps=STEPS, seed=b) for b in range(B)]


@pytest.mark.parametrize("B", [1, 8])
def test_engine(benchmark, models, B):
    benchmark.group = f"generate-tiny-b{B}"
    lm, _ = models
    tokens, _ = benchmark(engine_generate, lm, *inputs(B))
    assert tokens.shape == (B, 4, T)


@pytest.mark.parametrize("B", [1, 8])
def test_baseline(benchmark, models, B):
    benchmark.group = f"generate-tiny-b{B}"
    lm, base = models
    tokens, _ = benchmark(baseline_generate, base, lm.cfg, *inputs(B))
    assert tokens.shape == (B, 4, T)
