"""Engine LM (converted weights) vs the training-form model: same logits."""
import pytest
import torch

from stemgen.train import StemGenConfig

from helpers import load_engine_lm, make_model_dir, random_tokens

CONFIGS = {
    "C1-Q4": dict(d_model=64, n_heads=4, n_layers=2, n_q=4, codebook_size=48, n_channels=1),
    "C2-Q8-odd-heads": dict(d_model=96, n_heads=6, n_layers=2, n_q=8, codebook_size=37, n_channels=2),
    "C3-Q4-odd": dict(d_model=72, n_heads=3, n_layers=3, n_q=4, codebook_size=50, n_channels=3),
    "C2-Q4-extra-conds": dict(d_model=40, n_heads=2, n_layers=1, n_q=4, codebook_size=33, n_channels=2,
                              extra_cond_sizes=[5, 3], instruments=["drums", "bass", "guitar"]),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    cfg = StemGenConfig(ffn_multiple_of=16, **CONFIGS[request.param])
    train, model_dir = make_model_dir(tmp_path_factory.mktemp(request.param), cfg)
    return cfg, train, model_dir


@pytest.mark.parametrize("T", [1, 7, 257])
def test_engine_logits_match_training_model(pair, T):
    cfg, train, model_dir = pair
    engine = load_engine_lm(model_dir)
    gen = torch.Generator().manual_seed(T)
    tokens, conds = random_tokens(cfg, 2, T, gen, special=True)
    assert (tokens == cfg.mask_id).any() or T < 7
    with torch.no_grad():
        ref = train(tokens, conds)                     # [B, Q, T, V]
    got = engine(tokens, conds)                        # all heads
    scale = ref.abs().max()
    assert (got - ref).abs().max() <= 1e-4 * scale, float((got - ref).abs().max() / scale)
    for q in (0, cfg.n_q - 1):                         # one head only
        one = engine(tokens, conds, level=q)
        assert one.shape == (2, T, cfg.codebook_size)
        assert (one - ref[:, q]).abs().max() <= 1e-4 * scale


@pytest.mark.parametrize("dtype,tol", [("bfloat16", 5e-2), ("float16", 1e-2)])
def test_engine_low_precision_close(pair, dtype, tol):
    """bf16/fp16 weights and activations: loose tolerance relative to the logits' scale."""
    cfg, train, model_dir = pair
    engine = load_engine_lm(model_dir, dtype=dtype)
    tokens, conds = random_tokens(cfg, 2, 33, torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = train(tokens, conds)
    got = engine(tokens, conds)
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert rel <= tol, rel


def test_packed_requests_equal_separate_forwards(pair):
    """Several requests of different lengths in one packed forward, each with its own level and
    frame subset, give the same logits as separate forwards (the scheduler's batching)."""
    cfg, train, model_dir = pair
    engine = load_engine_lm(model_dir)
    gen = torch.Generator().manual_seed(2)
    reqs = []
    for R, T, level in [(3, 9, 0), (2, 1, cfg.n_q - 1), (1, 30, 0)]:
        tokens, conds = random_tokens(cfg, R, T, gen)
        positions = torch.arange(T)[torch.rand(T, generator=gen) < 0.6] if T > 1 else None
        reqs.append((tokens, conds, level, positions))
    packed = engine.forward_requests(reqs)
    for (tokens, conds, level, positions), got in zip(reqs, packed):
        alone = engine(tokens, conds, level=level)
        want = alone if positions is None else alone[:, positions]
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fp32-output head GEMM is the CUDA path")
def test_cuda_bf16_head_writes_fp32_logits():
    """On CUDA the bf16 head GEMM writes fp32 logits: within fp32 accumulation error of the exact
    product of the bf16 values (a bf16 output would be ~2^-9 off)."""
    from stemgen.engine.model import head_logits, mm_writes_fp32
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(300, 256, generator=g) * 4).to("cuda", torch.bfloat16)
    w = torch.randn(2048, 256, generator=g).to("cuda", torch.bfloat16)
    exact = x.double() @ w.double().t()
    err = ((head_logits(x, w).double() - exact).abs().max() / exact.abs().max()).item()
    assert mm_writes_fp32() and err < 1e-5, err


def test_head_logits_on_cpu_is_the_cast_gemm():
    from stemgen.engine.model import head_logits, linear
    x, w = torch.randn(5, 16).bfloat16(), torch.randn(7, 16).bfloat16()
    assert torch.equal(head_logits(x, w), linear(x, w).float())
