"""pytest-benchmark groups for the Triton kernels against their references at StemGen shapes
(d_model 1024, 16 heads, 2 channels, Q 4, 2048 codes; T = 500/1000/1500; 3 and 24 rows; bf16).
CUDA only (the CPU interpreter is for correctness, not speed):
    pytest bench/test_kernels_bench.py --benchmark-json out.json
Record the figures with the card's name in bench/RESULTS.md."""
import os

import pytest
import torch
import torch.nn.functional as F

from stemgen.kernels.attention import attention_ref
from stemgen.kernels.embedding import embed_sum_ref
from stemgen.kernels.norm import add_rms_norm_ref, silu_mul_ref
from stemgen.kernels.sampling import guide_sample_rank_ref

# Without a GPU the groups run only as a smoke test of this file (STEMGEN_BENCH_SMOKE=1: tiny
# shapes under the Triton interpreter, figures meaningless); tests/test_bench_files.py does that.
SMOKE = not torch.cuda.is_available()
pytestmark = pytest.mark.skipif(SMOKE and os.environ.get("STEMGEN_BENCH_SMOKE") != "1",
                                reason="Triton kernel timings need a CUDA GPU")
DEV = "cpu" if SMOKE else "cuda"
T_S, ROWS = ([7], [3]) if SMOKE else ([500, 1000, 1500], [3, 24])
D, H, DH, V = (64, 2, 32, 64) if SMOKE else (1024, 16, 64, 2048)


def sync_call(fn, *args, **kw):
    out = fn(*args, **kw)
    if not SMOKE:
        torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("T", T_S)
def test_embed_sum(benchmark, impl, rows, T):
    from stemgen.kernels import triton_ops as K
    benchmark.group = f"embed-sum T={T} rows={rows}"
    tokens = torch.randint(0, V + 2, (rows, 2, 4, T), device=DEV)
    conds = torch.randint(0, 18, (rows, 1), device=DEV)
    dtype = torch.float32 if SMOKE else torch.bfloat16
    tab = torch.randn(4 * (V + 2), D // 2, device=DEV, dtype=dtype)
    ctab = torch.randn(18, D // 2, device=DEV, dtype=dtype)
    off = torch.zeros(1, dtype=torch.long, device=DEV)
    fn = K.embed_sum if impl == "triton" else embed_sum_ref
    benchmark(sync_call, fn, tokens, conds, tab, ctab, off)


@pytest.mark.parametrize("impl", ["triton", "sdpa", "reference"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("T", T_S)
def test_attention(benchmark, impl, rows, T):
    from stemgen.kernels import triton_ops as K
    benchmark.group = f"attention T={T} rows={rows}"
    dtype = torch.float32 if SMOKE else torch.bfloat16  # the interpreter's bf16 dot is broken
    q, k, v = torch.randn(3, rows * T, H, DH, device=DEV, dtype=dtype).unbind(0)
    ang = torch.outer(torch.arange(T, device=DEV).float(), torch.rand(DH // 2, device=DEV))
    cos, sin = ang.cos(), ang.sin()
    if impl == "sdpa":  # torch SDPA alone (no RoPE), the bar to meet
        qs, ks, vs = (z.view(rows, T, H, DH).transpose(1, 2) for z in (q, k, v))
        benchmark(sync_call, F.scaled_dot_product_attention, qs, ks, vs)
    else:
        fn = K.attention if impl == "triton" else attention_ref
        benchmark(sync_call, fn, q, k, v, [(rows, T)], cos, sin)


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("T", T_S)
def test_add_rms_norm(benchmark, impl, rows, T):
    from stemgen.kernels import triton_ops as K
    benchmark.group = f"residual add + RMSNorm T={T} rows={rows}"
    dtype = torch.float32 if SMOKE else torch.bfloat16
    x, delta = torch.randn(2, rows * T, D, device=DEV, dtype=dtype).unbind(0)
    w = torch.rand(D, device=DEV, dtype=dtype)
    benchmark(sync_call, K.add_rms_norm if impl == "triton" else add_rms_norm_ref, x, delta, w, 1e-5)


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("T", T_S)
def test_silu_mul(benchmark, impl, rows, T):
    from stemgen.kernels import triton_ops as K
    benchmark.group = f"silu(gate) * up T={T} rows={rows}"
    dtype = torch.float32 if SMOKE else torch.bfloat16
    gate_up = torch.randn(rows * T, 2 * (D * 11 // 4), device=DEV, dtype=dtype)   # paper: 2 x 2816
    benchmark(sync_call, K.silu_mul if impl == "triton" else silu_mul_ref, gate_up)


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("T", T_S)
def test_guide_sample_rank(benchmark, impl, T):
    from stemgen.kernels import triton_ops as K
    benchmark.group = f"guide+sample T={T} rows=3"
    logits = torch.randn(3, T, V, device=DEV)
    w = torch.tensor([3.0, 3.0, -5.0], device=DEV)
    fn = K.guide_sample_rank if impl == "triton" else guide_sample_rank_ref
    benchmark(sync_call, fn, logits, w, torch.arange(T, device=DEV), torch.ones(T, dtype=torch.bool, device=DEV),
              T, seed=0, level=0, step=0)
