"""pytest-benchmark: one group per op of the kernels table and shape, every implementation present
on this device against the op's PyTorch reference, at StemGen shapes (d_model 1024 -> 512 per
channel, 16 heads of 64, 2 channels, Q 4, 2048 codes, SwiGLU 2 x 2816; the engine's dtype; 3 and 24 rows;
T = 500 frames on the CPU, 500/1000/1500 on CUDA):
    pytest bench/test_ops_bench.py [--benchmark-json out.json]
CPU: the reference vs the C++ ops (and the codec's RVQ encode); CUDA: the reference vs the Triton
kernels (and torch SDPA alone, the bar for attention). Compare 'Mean' within a group and record the
figures with the CPU model / card in bench/RESULTS.md.
Without a GPU, STEMGEN_BENCH_SMOKE=1 runs the Triton groups once on tiny shapes under the
interpreter (a check of this file: tests/test_bench_files.py; figures meaningless)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from stemgen.engine.backend import unavailable
from stemgen.engine.model import default_dtype
from stemgen.kernels import OPS

SMOKE = os.environ.get("STEMGEN_BENCH_SMOKE") == "1" and not torch.cuda.is_available()
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
BACKEND = "triton" if CUDA or SMOKE else "cpp"
# the engine's dtype here (bf16 on CUDA and on CPUs with native bf16, else fp32); the
# interpreter's bf16 dot is broken, so fp32 in the smoke run
DTYPE = torch.float32 if SMOKE else default_dtype(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
T_S = [7] if SMOKE else [500, 1000, 1500] if CUDA else [500]
ROWS = [3] if SMOKE else [3, 24]
D, H, DH, V, HID = (64, 2, 32, 64, 44) if SMOKE else (1024, 16, 64, 2048, 2816)


def implementations(op_name: str):
    """The reference and this device's fast variant of the op, where present and taking DTYPE."""
    op = OPS[op_name]
    out = [pytest.param(op.reference, id="reference")]
    variant = op.variants.get(BACKEND)
    if variant is not None and variant.accepts(DTYPE):
        missing = unavailable(BACKEND, DEV)
        out.append(pytest.param(None if missing else variant.load(), id=BACKEND,
                                marks=[pytest.mark.skipif(missing is not None, reason=f"{BACKEND}: {missing}")]))
    return out


def timed(benchmark, fn, *args, **kw):
    def call():
        out = fn(*args, **kw)
        if CUDA:
            torch.cuda.synchronize()
        return out
    benchmark(call)


@pytest.mark.parametrize("fn", implementations("embed_sum"))
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("T", T_S)
def test_embed_sum(benchmark, fn, rows, T):
    benchmark.group = f"embed-sum T={T} rows={rows}"
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V + 2, (rows, 2, 4, T), generator=g).to(DEV)
    conds = torch.randint(0, 18, (rows, 1), generator=g).to(DEV)
    tab, ctab = torch.randn(4 * (V + 2), D // 2).to(DEV, DTYPE), torch.randn(18, D // 2).to(DEV, DTYPE)
    timed(benchmark, fn, tokens, conds, tab, ctab, torch.zeros(1, dtype=torch.long, device=DEV))


@pytest.mark.parametrize("fn", implementations("attention") + ([pytest.param("sdpa", id="sdpa")] if CUDA else []))
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("T", T_S)
def test_attention(benchmark, fn, rows, T):
    benchmark.group = f"attention T={T} rows={rows}"
    q, k, v = torch.randn(rows * T, 3, H, DH).to(DEV, DTYPE).unbind(1)   # views of one qkv, as the model's
    ang = torch.outer(torch.arange(T).float(), torch.rand(DH // 2)).to(DEV)
    if fn == "sdpa":  # torch SDPA alone (no RoPE), the bar to meet
        qs, ks, vs = (z.view(rows, T, H, DH).transpose(1, 2) for z in (q, k, v))
        timed(benchmark, F.scaled_dot_product_attention, qs, ks, vs)
    else:
        timed(benchmark, fn, q, k, v, [(rows, T)], ang.cos(), ang.sin())


@pytest.mark.skipif(CUDA, reason="the int8 path is the CPU's")
@pytest.mark.parametrize("fn", implementations("int8_swiglu") + [pytest.param("fp32", id="fp32")])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("T", T_S)
def test_int8_swiglu(benchmark, fn, rows, T):
    """The int8 feed-forward (both GEMMs int8, its middle fused) against its reference and against the
    fp32 feed-forward it replaces (F.linear, silu * up, F.linear: the GEMMs the fp32 engine runs)."""
    from stemgen.kernels.int8_linear import quantize_weight
    from stemgen.kernels.swiglu import silu_mul_ref
    benchmark.group = f"int8 feed-forward T={T} rows={rows} d={D} hidden={HID}"
    x, w13, w2 = torch.randn(rows * T, D), torch.randn(2 * HID, D) / D ** 0.5, torch.randn(D, HID) / HID ** 0.5
    if fn == "fp32":
        timed(benchmark, lambda: F.linear(silu_mul_ref(F.linear(x, w13)), w2))
    else:
        timed(benchmark, fn, x, *quantize_weight(w13), *quantize_weight(w2))


@pytest.mark.parametrize("fn", implementations("rms_norm"))
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("T", T_S)
def test_rms_norm(benchmark, fn, rows, T):
    benchmark.group = f"RMSNorm T={T} rows={rows} d={D}"
    timed(benchmark, fn, torch.randn(rows * T, D).to(DEV, DTYPE), torch.rand(D).to(DEV, DTYPE), 1e-5)


@pytest.mark.parametrize("fn", implementations("add_rms_norm"))
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("T", T_S)
def test_add_rms_norm(benchmark, fn, rows, T):
    benchmark.group = f"residual add + RMSNorm T={T} rows={rows} d={D}"
    x, delta = torch.randn(2, rows * T, D).to(DEV, DTYPE).unbind(0)
    timed(benchmark, fn, x, delta, torch.rand(D).to(DEV, DTYPE), 1e-5)


@pytest.mark.parametrize("fn", implementations("silu_mul"))
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("T", T_S)
def test_silu_mul(benchmark, fn, rows, T):
    benchmark.group = f"silu(gate) * up T={T} rows={rows} h={HID}"
    timed(benchmark, fn, torch.randn(rows * T, 2 * HID).to(DEV, DTYPE))


@pytest.mark.parametrize("fn", implementations("guide_sample_rank"))
@pytest.mark.parametrize("T", T_S)
def test_guide_sample_rank(benchmark, fn, T):
    benchmark.group = f"guide+sample T={T} rows=3 V={V}"
    logits = (torch.randn(3, T, V) * 3).to(DEV)
    w = torch.tensor([3.0, 3.0, -5.0], device=DEV)
    timed(benchmark, fn, logits, w, torch.arange(T, device=DEV), torch.ones(T, dtype=torch.bool, device=DEV), T,
          seed=0, level=0, step=0)


@pytest.mark.parametrize("fn", implementations("fold_guidance"))
@pytest.mark.parametrize("T", T_S)
def test_head_and_guidance(benchmark, fn, T):
    """A step's tail: the guidance rows before the head (every row, or folded into their weighted sum),
    the level head's GEMM at every frame, then guidance + sampling (the engine's op for it)."""
    from stemgen.engine.backend import backend_ops
    from stemgen.engine.model import head_logits
    benchmark.group = f"level head + guidance T={T} rows=3 d={D} V={V}"
    sample = backend_ops(BACKEND, DTYPE).guide_sample_rank
    weights = [3.0, 3.0, -5.0]
    rows, head = torch.randn(3, T, D).to(DEV, DTYPE), (torch.randn(V, D) / D ** 0.5).to(DEV, DTYPE)
    w, one = torch.tensor(weights, device=DEV), torch.ones(1, device=DEV)
    pos, masked = torch.arange(T, device=DEV), torch.ones(T, dtype=torch.bool, device=DEV)

    def tail():
        x = fn(rows, weights)
        logits = head_logits(x.reshape(-1, D), head).view(x.shape[0], T, V)
        return sample(logits, w if x.shape[0] == 3 else one, pos, masked, T, seed=0, level=0, step=0)
    timed(benchmark, tail)


if BACKEND == "cpp" and unavailable("cpp") is None:   # the codec's RVQ encode: a C++ op (no Triton one)
    @pytest.mark.parametrize("impl", ["reference", "cpp"])
    @pytest.mark.parametrize("N", [250, 1000])
    def test_rvq_encode(benchmark, impl, N):
        from stemgen import cpp_ext
        from stemgen.engine.codec import rvq_encode_ref

        benchmark.group = f"rvq-encode (codec) N={N}"
        g = torch.Generator().manual_seed(0)
        fn = cpp_ext.rvq_encode if impl == "cpp" else rvq_encode_ref
        timed(benchmark, fn, torch.randn(N, 128, generator=g), torch.randn(4, 2048, 128, generator=g))
