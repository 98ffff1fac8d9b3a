"""The CPU's int8 path: the int8 GEMM variant against its reference (integer products in fp64) over
odd shapes, exact batch invariance, the quantization error against fp32, and a whole model in int8
against fp32 (logits and top-1)."""
import os

import pytest
import torch

from stemgen.kernels.int8_linear import int8_linear_ref, int8_swiglu_ref, quantize_weight

from helpers import NEEDS_CPP, variants

SHAPES = [(1, 8, 8), (5, 37, 13), (257, 256, 768), (64, 1024, 96), (3, 4099, 7)]


@pytest.mark.parametrize("fn,dtype", variants("int8_linear"))
@pytest.mark.parametrize("N,K,M", SHAPES)
def test_matches_reference(fn, dtype, N, K, M):
    g = torch.Generator().manual_seed(N + K + M)
    x, w = torch.randn(N, K, generator=g) * 3, torch.randn(M, K, generator=g) / K ** 0.5
    wq, s = quantize_weight(w)
    assert wq.dtype == torch.int8 and wq.shape == (K, M)
    got, want = fn(x, wq, s), int8_linear_ref(x, wq, s)
    assert torch.equal(got, want)   # the same roundings, the same exact integer products, the same float ops
    # against the fp32 product: per-row and per-channel 8-bit rounding, about 1% of the output's scale
    exact = x @ w.t()
    assert (got - exact).abs().max() <= 0.03 * exact.abs().max()


@pytest.mark.parametrize("fn,dtype", variants("int8_linear"))
def test_rows_do_not_depend_on_the_batch(fn, dtype):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(300, 64, generator=g), torch.randn(48, 64, generator=g)
    wq, s = quantize_weight(w)
    assert torch.equal(fn(x, wq, s)[17:19], fn(x[17:19], wq, s))


@pytest.mark.parametrize("fn,dtype", variants("int8_linear"))
def test_ties_round_to_even_and_zero_rows(fn, dtype):
    """Rows whose quantized values fall exactly half-way (scale 1: max 127) round half to even, as
    torch.round; an all-zero row gets scale 1 and stays zero."""
    x = torch.tensor([[127.0, 2.5, -3.5, 0.5, -0.5, 1.5, 126.5, -127.0], [0.0] * 8])
    # 8-bit weight codes on every CPU: one non-zero weight per column never saturates a pair
    wq, s = quantize_weight(torch.eye(8) * torch.arange(1.0, 9.0)[:, None], qmax=127)
    got, want = fn(x, wq, s), int8_linear_ref(x, wq, s)
    assert torch.equal(got, want) and torch.equal(got[1], torch.zeros(8))
    assert torch.equal(got[0, 1:7] / torch.arange(2.0, 8.0), torch.tensor([2.0, -4.0, 0.0, -0.0, 2.0, 126.0]))


@pytest.mark.parametrize("fn,dtype", variants("int8_linear"))
def test_non_finite_rows_give_nan_rows(fn, dtype):
    """A row holding NaN or inf is NaN throughout its output (never a finite result that hides it);
    the other rows are untouched."""
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(4, 40, generator=g), torch.randn(24, 40, generator=g)
    x[1, 3], x[2, 0] = float("nan"), float("inf")
    wq, s = quantize_weight(w)
    got, want = fn(x, wq, s), int8_linear_ref(x, wq, s)
    assert got[1:3].isnan().all() and want[1:3].isnan().all()
    assert torch.equal(got[[0, 3]], want[[0, 3]]) and torch.equal(got[[0, 3]], fn(x[[0, 3]], wq, s))


FFN_SHAPES = [(1, 8, 4, 8), (5, 37, 13, 11), (257, 256, 768, 256), (3, 99, 160, 7)]


def ffn_args(N, K, H, M, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, K, generator=g) * scale
    w13, w2 = torch.randn(2 * H, K, generator=g) / K ** 0.5, torch.randn(M, H, generator=g) / H ** 0.5
    return (x, *quantize_weight(w13), *quantize_weight(w2)), (x, w13, w2)


@pytest.mark.parametrize("fn,dtype", variants("int8_swiglu"))
@pytest.mark.parametrize("N,K,H,M", FFN_SHAPES)
def test_swiglu_matches_reference(fn, dtype, N, K, H, M):
    """The fused feed-forward against the reference (int8_linear_ref, silu_mul_ref, int8_linear_ref)
    and against the fp32 feed-forward. The C++ silu's exp is within ~2 ulp of torch's, so a middle
    value may round to the neighbouring int8 code: within 1% of the output's scale, not bit-equal."""
    args, (x, w13, w2) = ffn_args(N, K, H, M, N + K + H + M)
    got, want = fn(*args), int8_swiglu_ref(*args)
    assert got.shape == (N, M) and got.dtype == torch.float32
    assert (got - want).abs().max() <= 0.01 * want.abs().max()
    gu = x @ w13.t()
    exact = (torch.nn.functional.silu(gu[:, :H]) * gu[:, H:]) @ w2.t()
    assert (got - exact).abs().max() <= 0.05 * exact.abs().max()


@pytest.mark.parametrize("N,K,H,M", FFN_SHAPES)
def test_swiglu_cpp_equals_its_unfused_ops(N, K, H, M):
    """C++ fused middle == the C++ ops it replaces (dequantize, silu_mul_f32, quantize_rows), bit for bit."""
    from helpers import backend_missing
    if backend_missing("cpp"):
        pytest.fail(f"the C++ extension should be built for the tests: {backend_missing('cpp')}")
    from stemgen import cpp_ext
    args, _ = ffn_args(N, K, H, M, 7 * N + K)
    x, w13q, s13, w2q, s2 = args
    assert torch.equal(cpp_ext.int8_swiglu(*args),
                       cpp_ext.int8_linear2(cpp_ext.silu_mul(cpp_ext.int8_linear(x, w13q, s13)), w2q, s2))


@pytest.mark.parametrize("fn,dtype", variants("int8_swiglu"))
def test_swiglu_rows_independent_and_non_finite(fn, dtype):
    args, _ = ffn_args(300, 64, 48, 40, 3)
    x = args[0]
    x[5, 2], x[9, 0] = float("nan"), float("-inf")
    got = fn(*args)
    assert got[[5, 9]].isnan().all()
    keep = [i for i in range(300) if i not in (5, 9)]
    assert got[keep].isfinite().all()
    assert torch.equal(got[17:19], fn(x[17:19], *args[1:]))


@pytest.mark.parametrize("fn,dtype", variants("int8_swiglu"))
def test_swiglu_very_negative_gate_gives_zero(fn, dtype):
    """A gate of -100 (exp(100) overflows float32): silu ~ 0, so the row's output is ~0, not -100."""
    args = (torch.ones(1, 1), *quantize_weight(torch.tensor([[-100.0], [1.0]])), *quantize_weight(torch.ones(1, 1)))
    assert fn(*args).abs().max() < 1e-3


@pytest.mark.parametrize("fn,dtype", variants("int8_linear"))
def test_a_single_input_feature(fn, dtype):
    """K = 1 (torch._int_mm on the CPU returns uninitialised memory there): still the reference's."""
    x, w = torch.randn(5, 1), torch.randn(7, 1)
    for _ in range(3):
        assert torch.equal(fn(x, *quantize_weight(w)), int8_linear_ref(x, *quantize_weight(w)))


def test_zero_rows_stay_zero():
    wq, s = quantize_weight(torch.randn(8, 16))
    assert torch.equal(int8_linear_ref(torch.zeros(2, 16), wq, s), torch.zeros(2, 8))


def test_model_in_int8_against_fp32(tmp_path):
    """A random small StemGen LM: --dtype int8 logits within a few percent of fp32's scale, the same
    top-1 code on most frames, and tokens of a request independent of its batch."""
    from helpers import load_engine_lm, make_model_dir
    from stemgen.engine.request import Request
    from stemgen.engine.config import SamplingConfig
    from stemgen.engine.runner import run_requests
    from stemgen.train import StemGenConfig
    cfg = StemGenConfig(d_model=64, n_heads=4, n_layers=2, codebook_size=64, ffn_multiple_of=32,
                        instruments=["bass", "drums"])
    _, d = make_model_dir(tmp_path, cfg)
    fp32, int8 = load_engine_lm(d), load_engine_lm(d, dtype="int8")
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, 64, (2, 2, 4, 50), generator=g)
    cond = torch.randint(0, 2, (2, 1), generator=g)
    a, b = (m.forward_requests([(tok, cond, 1, None)])[0] for m in (fp32, int8))
    assert (a - b).abs().max() <= 0.1 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8
    ctx = [torch.randint(0, 64, (1, 4, T), generator=g) for T in (23, 40)]
    s = SamplingConfig(steps=(3, 2, 1, 1))
    mk = lambda c: Request(int8.cfg, c, torch.tensor([0]), s)  # noqa: E731
    alone = [run_requests(int8, [mk(c)])[0] for c in ctx]
    assert all(torch.equal(x, y) for x, y in zip(alone, run_requests(int8, [mk(c) for c in ctx])))


@NEEDS_CPP
@pytest.mark.parametrize("N,K,M", SHAPES)
def test_two_part_linear_matches_reference_and_keeps_small_values(N, K, M):
    """The down projection's input in two int8 parts (quantize_rows2): C++ equal to the reference bit
    for bit (the same float ops, exact integer products), NaN / inf rows NaN; on a row of many small
    values beside one large one (silu(gate) * up's shape) it is far closer to the fp32 product than
    one int8 part."""
    from stemgen import cpp_ext
    from stemgen.kernels.int8_linear import int8_linear2_ref
    g = torch.Generator().manual_seed(N * K + M)
    x, w = torch.randn(N, K, generator=g) * 0.05, torch.randn(M, K, generator=g) / K ** 0.5
    x[:, 0] = 8.0                                           # one large value per row
    if N > 2:
        x[1, K // 2] = float("nan")
    wq, s = quantize_weight(w)
    got, want = cpp_ext.int8_linear2(x, wq, s), int8_linear2_ref(x, wq, s)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    ok = ~x.isnan().any(1)
    assert got[~ok].isnan().all() and got[ok].isfinite().all()
    assert torch.equal(got[ok][:2], cpp_ext.int8_linear2(x[ok][:2], wq, s))   # rows independent of the batch
    if K >= 37:
        exact = x[ok] @ (wq.float() * s[None, :])   # the product with the int8 weight itself
        two = (got[ok] - exact).abs().max()
        one = (int8_linear_ref(x[ok], wq, s) - exact).abs().max()
        assert two <= 0.05 * one


def _saturating_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch._int_mm as oneDNN runs it without VNNI (AVX2's vpmaddubsw): the activations shifted by
    128 to unsigned bytes, each pair of byte products added in 16 bits with saturation, then the shift
    taken back out."""
    au, bl = a.long() + 128, b.long()
    if a.shape[1] % 2:
        au, bl = torch.cat([au, torch.zeros_like(au[:, :1])], 1), torch.cat([bl, torch.zeros_like(bl[:1])], 0)
    pairs = au[:, 0::2, None] * bl[None, 0::2] + au[:, 1::2, None] * bl[None, 1::2]
    return (pairs.clamp(-32768, 32767).sum(1) - 128 * bl.sum(0)).int()


@pytest.mark.parametrize("gemm,want", [(lambda a, b: (a.long() @ b.long()).int(), 127), (_saturating_int_mm, 63)])
def test_weight_codes_follow_what_the_int8_gemm_sums_exactly(monkeypatch, gemm, want):
    """The probe picks 8-bit weight codes for an exact int8 GEMM and 7-bit ones for a GEMM that
    saturates pairs of products in 16 bits (oneDNN without VNNI), and says why; with those codes the
    saturating GEMM is exact on the worst case, where 8-bit codes are far off."""
    from stemgen.kernels import int8_linear
    monkeypatch.setattr(torch, "_int_mm", gemm)
    qmax, why = int8_linear.weight_code_max.__wrapped__()
    assert qmax == want and why.startswith(f"+-{want} ")
    a = torch.full((4, 64), 127, dtype=torch.int8)
    for q in (63, 127):
        b = torch.full((64, 8), q, dtype=torch.int8)
        assert torch.equal(_saturating_int_mm(a, b).long(), a.long() @ b.long()) == (q == 63)


def test_weight_codes_refuse_a_gemm_that_is_never_exact(monkeypatch):
    from stemgen.kernels import int8_linear
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: (a.long() @ b.long()).int() + 1)
    with pytest.raises(RuntimeError, match="use --dtype float32"):
        int8_linear.weight_code_max.__wrapped__()


@NEEDS_CPP
def test_int8_path_is_exact_with_the_gemm_held_to_avx2():
    """oneDNN held to AVX2 (no VNNI; ONEDNN_MAX_CPU_ISA, as on an AVX2-only CPU): the int8 ops with the
    weights quantized for this machine equal their references bit for bit on the worst case (every
    weight at the codes' bound, every activation at +-127) and on random rows. Before the weight
    codes followed the GEMM, 8-bit codes summed to 8,160 where the product is 1,032,256."""
    import subprocess
    import sys
    code = """
import torch
from stemgen import cpp_ext
from stemgen.kernels.int8_linear import int8_linear_ref, int8_linear2_ref, int8_swiglu_ref, quantize_weight
g = torch.Generator().manual_seed(0)
for x, w in ((torch.full((300, 256), 1.0), torch.full((64, 256), 1.0)),
             (torch.randn(300, 256, generator=g), torch.randn(96, 256, generator=g))):
    wq, s = quantize_weight(w)
    assert torch.equal(cpp_ext.int8_linear(x, wq, s), int8_linear_ref(x, wq, s))
    assert torch.equal(cpp_ext.int8_linear2(x, wq, s), int8_linear2_ref(x, wq, s))
    exact = x @ w.t()
    assert (cpp_ext.int8_linear(x, wq, s) - exact).abs().max() <= 0.03 * exact.abs().max()
x, w13, w2 = (torch.randn(*sh, generator=g) for sh in ((300, 64), (96, 64), (64, 48)))
args = (x, *quantize_weight(w13), *quantize_weight(w2))
got, want = cpp_ext.int8_swiglu(*args), int8_swiglu_ref(*args)   # C++ silu: within float rounding
assert (got - want).abs().max() <= 1e-4 * want.abs().max()
assert torch.equal(got, cpp_ext.int8_linear2(cpp_ext.silu_mul(cpp_ext.int8_linear(x, *args[1:3])), *args[3:]))
print("ok")
"""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
