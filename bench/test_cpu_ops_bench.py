"""pytest-benchmark groups: each C++ CPU op against its PyTorch reference at StemGen shapes
(d_model 1024 -> 512 per channel, 2 channels, Q 4, 2048 codes, SwiGLU width 2816; T = 500 frames;
3 and 24 rows).
Run: pytest bench/test_cpu_ops_bench.py [--benchmark-json out.json]; compare 'Mean' within a group."""
import pytest
import torch

from stemgen import cpp_ext
from stemgen.engine.codec import rvq_encode_ref
from stemgen.kernels.embedding import embed_sum_ref
from stemgen.kernels.norm import add_rms_norm_ref, silu_mul_ref
from stemgen.kernels.sampling import guide_sample_rank_ref

pytestmark = pytest.mark.skipif(not cpp_ext.available(), reason=f"C++ extension {cpp_ext.status()}")
OPS = {"reference": (embed_sum_ref, guide_sample_rank_ref, rvq_encode_ref, add_rms_norm_ref, silu_mul_ref),
       "cpp": (cpp_ext.embed_sum, cpp_ext.guide_sample_rank, cpp_ext.rvq_encode, cpp_ext.add_rms_norm,
               cpp_ext.silu_mul)}


@pytest.mark.parametrize("impl", list(OPS))
@pytest.mark.parametrize("rows", [3, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embed_sum(benchmark, impl, rows, dtype):
    benchmark.group = f"embed-sum rows={rows} {dtype}"
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 2050, (rows, 2, 4, 500), generator=g)
    conds = torch.randint(0, 18, (rows, 1), generator=g)
    table, ctable = torch.randn(4 * 2050, 512).to(dtype), torch.randn(18, 512).to(dtype)
    benchmark(OPS[impl][0], tokens, conds, table, ctable, torch.tensor([0]))


@pytest.mark.parametrize("impl", list(OPS))
@pytest.mark.parametrize("R,M", [(3, 500), (3, 250), (1, 500)])
def test_guide_sample_rank(benchmark, impl, R, M):
    benchmark.group = f"guide+sample R={R} M={M}"
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(R, M, 2048, generator=g) * 3
    w = torch.tensor([3.0, 3.0, -5.0][:R]) if R == 3 else torch.ones(R)
    benchmark(OPS[impl][1], logits, w, torch.arange(M), torch.ones(M, dtype=torch.bool), 500, seed=0, level=0,
              step=0)


@pytest.mark.parametrize("impl", list(OPS))
@pytest.mark.parametrize("N", [250, 1000])
def test_rvq_encode(benchmark, impl, N):
    benchmark.group = f"rvq-encode N={N}"
    g = torch.Generator().manual_seed(0)
    benchmark(OPS[impl][2], torch.randn(N, 128, generator=g), torch.randn(4, 2048, 128, generator=g))


@pytest.mark.parametrize("impl", list(OPS))
@pytest.mark.parametrize("rows", [3, 24])
def test_add_rms_norm(benchmark, impl, rows):
    benchmark.group = f"residual add + RMSNorm rows={rows} x 500 frames, d 1024, bf16"
    g = torch.Generator().manual_seed(0)
    x, delta = torch.randn(2, rows * 500, 1024, generator=g).bfloat16().unbind(0)
    benchmark(OPS[impl][3], x, delta, torch.rand(1024, generator=g).bfloat16(), 1e-5)


@pytest.mark.parametrize("impl", list(OPS))
@pytest.mark.parametrize("rows", [3, 24])
def test_silu_mul(benchmark, impl, rows):
    benchmark.group = f"silu(gate) * up rows={rows} x 500 frames, h 2816, bf16"
    gate_up = torch.randn(rows * 500, 2 * 2816, generator=torch.Generator().manual_seed(0)).bfloat16()
    benchmark(OPS[impl][4], gate_up)
