"""The fp32 trunk GEMM on the CPU: oneDNN on weights packed at load against PyTorch's F.linear over
odd shapes, the exact pack round trip, exact batch invariance through engine.model.linear, and a
whole fp32 model with packed weights against the same model on the reference GEMM."""
import pytest
import torch

from stemgen.engine.model import PackedWeight, linear
from stemgen.kernels.linear import linear_ref, pack_weight
from stemgen.train import StemGenConfig

from helpers import load_engine_lm, make_model_dir, random_tokens, variants

SHAPES = [(1, 8, 8), (5, 37, 13), (257, 256, 768), (64, 1024, 96), (3, 4099, 7), (300, 4096, 33)]


@pytest.mark.parametrize("fn,dtype", variants("linear"))
@pytest.mark.parametrize("N,K,M", SHAPES)
def test_matches_reference(fn, dtype, N, K, M):
    g = torch.Generator().manual_seed(N + K + M)
    x, w = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g) / K ** 0.5
    got, want = fn(x, pack_weight(w)), linear_ref(x, w)
    assert got.dtype == torch.float32 and got.shape == (N, M)
    # fp32 sums in another order: a few ulps of the products' magnitudes
    tol = 1e-5 * (x.abs() @ w.abs().t()).max()
    assert (got - want).abs().max() <= tol


def test_pack_round_trip_is_exact():
    w = torch.randn(37, 53)
    p = pack_weight(w)
    assert p.is_mkldnn and p.shape == w.shape and torch.equal(p.to_dense(), w)
    assert torch.equal(linear_ref(torch.ones(2, 53), p), linear_ref(torch.ones(2, 53), w))


@pytest.mark.parametrize("fn,dtype", variants("linear"))
@pytest.mark.parametrize("K", [96, 4096])
def test_rows_do_not_depend_on_the_batch(fn, dtype, K):
    """Through engine.model.linear (CPU GEMMs padded to MIN_GEMM_ROWS rows) a row's result is the
    same alone, in any slice and in any batch size, to the bit (a lone row would take another
    kernel without the padding)."""
    g = torch.Generator().manual_seed(K)
    x, w = torch.randn(700, K, generator=g), torch.randn(48, K, generator=g)
    pw = PackedWeight(w, fn)
    full = linear(x, pw)
    for a, b in [(17, 18), (0, 3), (100, 355), (5, 700)]:
        assert torch.equal(linear(x[a:b], pw), full[a:b]), (a, b)


@pytest.mark.parametrize("fn,dtype", variants("linear"))
def test_packed_model_close_to_reference_model(fn, dtype, tmp_path, monkeypatch):
    """The fp32 engine with its trunk weights packed (the default on the CPU) against the same model
    on the reference GEMM (STEMGEN_BACKEND=reference): logits within 1e-5 of their scale."""
    cfg = StemGenConfig(d_model=96, n_heads=6, n_layers=2, codebook_size=37, ffn_multiple_of=16, n_channels=2)
    _, model_dir = make_model_dir(tmp_path, cfg)
    fast = load_engine_lm(model_dir)
    assert all(isinstance(getattr(layer, n), PackedWeight) for layer in fast.layers for n in fast.TRUNK_WEIGHTS)
    monkeypatch.setenv("STEMGEN_BACKEND", "reference")
    ref = load_engine_lm(model_dir)
    assert not any(isinstance(getattr(layer, n), PackedWeight) for layer in ref.layers for n in ref.TRUNK_WEIGHTS)
    tokens, conds = random_tokens(cfg, 2, 41, torch.Generator().manual_seed(3), special=True)
    got, want = fast(tokens, conds), ref(tokens, conds)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
