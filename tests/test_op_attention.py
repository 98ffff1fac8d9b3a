"""Attention of the packed batch: every fast variant in the kernels table (Triton) vs the PyTorch
reference (RoPE + SDPA per sequence): packed sequences of unequal lengths, odd head dims."""
import os

import pytest
import torch

from stemgen.kernels.attention import attention_ref

from helpers import on_device, variants


def rope_tables(T, dh):
    ang = torch.outer(torch.arange(T, dtype=torch.float64), 1 / 10000 ** (torch.arange(0, dh, 2).double() / dh))
    return ang.cos().float(), ang.sin().float()


@pytest.mark.parametrize("fn,dtype", variants("attention"))
@pytest.mark.parametrize("dh", [64, 128, 24])
@pytest.mark.parametrize("segments", [[(1, 1)], [(3, 3)], [(2, 257)], [(3, 9), (2, 1), (1, 40)]])
def test_matches_reference(fn, dtype, dh, segments):
    """fp32 within 1e-5 relative; q, k, v strided views of one qkv tensor, as in the engine."""
    if dh == 128 and segments == [(2, 257)]:
        segments = [(1, 130)]  # keep the interpreter quick
    g = torch.Generator().manual_seed(dh)
    H = 2
    N = sum(R * T for R, T in segments)
    q, k, v = torch.randn(N, 3, H, dh, generator=g).to(dtype).unbind(1)
    cos, sin = rope_tables(max(T for _, T in segments), dh)
    want = attention_ref(q, k, v, segments, cos, sin)
    got = fn(q, k, v, segments, cos, sin)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="Triton's CPU interpreter gets tl.dot on bf16 wrong (a 16x16 bf16 dot is off by 1e10 "
                           "there); this check needs a GPU")
@pytest.mark.parametrize("fn,dtype", variants("attention", (torch.bfloat16,)))
def test_bf16_loose(fn, dtype):
    g = torch.Generator().manual_seed(1)
    segments = [(2, 33), (1, 5)]
    q, k, v = torch.randn(3, 71, 2, 64, generator=g).to(dtype).unbind(0)
    cos, sin = rope_tables(33, 64)
    want = attention_ref(q.float(), k.float(), v.float(), segments, cos, sin)
    got = fn(q, k, v, segments, cos, sin).float()
    assert (got - want).abs().max() <= 3e-2 * want.abs().max()   # bf16 inputs: loose


def test_triton_small_tiles_match_reference():
    """Tiles smaller than the defaults (several query and key blocks per sequence)."""
    pytest.importorskip("triton", reason="Triton not installed")
    from stemgen.kernels.attention_triton import FlashConfig, attention

    segments = [(2, 45), (1, 7)]
    q, k, v = torch.randn(3, 97, 2, 32, generator=torch.Generator().manual_seed(3)).unbind(0)
    cos, sin = rope_tables(45, 32)
    want = attention_ref(q, k, v, segments, cos, sin)
    got = on_device(attention)(q, k, v, segments, cos, sin, config=FlashConfig(16, 16, 4))
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("rope", ["kernel", "q", "fused"])
@pytest.mark.parametrize("split_tail,acc_in_dot,tma", [(False, False, False), (True, False, False),
                                                       (False, True, False), (True, True, False),
                                                       (False, False, True), (True, True, True)])
def test_triton_configurations_match_reference(rope, split_tail, acc_in_dot, tma):
    """Every configuration the GPU sweep (bench/attn_sweep.py) may choose: where RoPE happens, the
    unmasked key blocks with a masked tail, the accumulation inside the dot, k and v through tensor
    descriptors. Small tiles, so a sequence spans several query and key blocks, ends in a partial
    block (45 = 2 x 16 + 13) whose descriptor reads run into the next sequence, fits in one partial
    block (7), or in exactly one full block (16, the last: its reads end at the tensor's end);
    q, k, v strided views of one qkv tensor."""
    pytest.importorskip("triton", reason="Triton not installed")
    from stemgen.kernels.attention_triton import FlashConfig, attention

    segments = [(2, 45), (1, 7), (1, 16)]
    q, k, v = torch.randn(113, 3, 2, 32, generator=torch.Generator().manual_seed(4)).unbind(1)
    cos, sin = rope_tables(45, 32)
    want = attention_ref(q, k, v, segments, cos, sin)
    cfg = FlashConfig(16, 16, 4, rope=rope, split_tail=split_tail, acc_in_dot=acc_in_dot, tma=tma)
    got = on_device(attention)(q, k, v, segments, cos, sin, config=cfg)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_triton_configurations_refuse_what_they_cannot_run():
    pytest.importorskip("triton", reason="Triton not installed")
    from stemgen.kernels.attention_triton import FlashConfig, attention

    q = torch.randn(5, 2, 24)
    cos, sin = rope_tables(5, 24)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        attention(q, q, q, [(1, 5)], cos, sin, config=FlashConfig(16, 16, 4, rope="q"))
    with pytest.raises(ValueError, match="tma needs a power-of-two head dim"):
        attention(q, q, q, [(1, 5)], cos, sin, config=FlashConfig(16, 16, 4, tma=True))
    q, k, v = torch.randn(5, 3, 32, 2).transpose(2, 3).unbind(1)   # a head's entries strided: no descriptor
    cos, sin = rope_tables(5, 32)
    with pytest.raises(ValueError, match="tma needs k rows of heads side by side"):
        attention(q, k, v, [(1, 5)], cos, sin, config=FlashConfig(16, 16, 4, rope="fused", tma=True))
    with pytest.raises(ValueError, match="'kernel', 'q' or 'fused'"):
        FlashConfig(16, 16, 4, rope="both")


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="Triton's CPU interpreter gets tl.dot on bf16 wrong; this check needs a GPU")
@pytest.mark.parametrize("rope", ["kernel", "q", "fused"])
@pytest.mark.parametrize("tma", [False, True])
def test_triton_configurations_bf16_on_gpu(rope, tma):
    """The sweep's options in bf16 on the hardware, at the engine's tile and the larger one: sequences
    of several blocks with partial tails, q, k, v strided views of one qkv tensor."""
    from stemgen.kernels.attention_triton import FlashConfig, attention

    segments = [(2, 200), (1, 77), (1, 64)]
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(541, 3, 4, 64, generator=g).to("cuda", torch.bfloat16).unbind(1)
    cos, sin = (t.cuda() for t in rope_tables(200, 64))
    want = attention_ref(q.float(), k.float(), v.float(), segments, cos, sin)
    for tile in [(64, 64, 4, 3), (128, 64, 8, 3)]:
        cfg = FlashConfig(*tile, rope=rope, split_tail=True, acc_in_dot=True, tma=tma)
        got = attention(q, k, v, segments, cos, sin, config=cfg).float()
        assert (got - want).abs().max() <= 3e-2 * want.abs().max(), cfg


def test_flash_config_from_the_environment(monkeypatch):
    """STEMGEN_FLASH_CONFIG overrides the fields it names (as the sweep prints them) in what the engine
    runs, and the engine's Triton ops then compute the reference's result; a malformed value is one
    clear error when the Triton ops are chosen, not a fallback."""
    pytest.importorskip("triton", reason="Triton not installed")
    from stemgen.engine.backend import select_ops
    from stemgen.kernels.attention_triton import FlashConfig, attention, attention_config, parse_flash_config

    base = attention_config(torch.float32, 32)
    assert parse_flash_config(base.text(), FlashConfig(16, 16, 1)) == base   # text() round-trips
    monkeypatch.setenv("STEMGEN_FLASH_CONFIG", "block_m=16, block_n=16, rope=fused, split_tail=1, tma=1")
    cfg = attention_config(torch.float32, 32)
    assert (cfg.block_m, cfg.block_n, cfg.warps, cfg.rope, cfg.split_tail, cfg.acc_in_dot, cfg.tma) == \
        (16, 16, base.warps, "fused", True, False, True)
    segments = [(2, 45), (1, 7)]
    q, k, v = torch.randn(97, 3, 2, 32, generator=torch.Generator().manual_seed(6)).unbind(1)
    cos, sin = rope_tables(45, 32)
    want = attention_ref(q, k, v, segments, cos, sin)
    assert (on_device(attention)(q, k, v, segments, cos, sin) - want).abs().max() <= 1e-5 * want.abs().max()
    for bad, why in [("rope=both", "'kernel', 'q' or 'fused'"), ("tma=yes", "tma is 0 or 1"),
                     ("block_m=48", "power of two >= 16"), ("tiles=64", "not key=value with a key of")]:
        monkeypatch.setenv("STEMGEN_FLASH_CONFIG", bad)
        with pytest.raises(ValueError, match=why):
            attention_config(torch.float32, 32)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":   # the Triton ops can be chosen
            monkeypatch.setenv("STEMGEN_BACKEND", "triton")
            with pytest.raises(ValueError, match=f"STEMGEN_FLASH_CONFIG='{bad}'"):
                select_ops(device, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("segments", [[(3, 9), (2, 1), (1, 40)], [(2, 17)]])
def test_cpp_rope_pack_equals_rope_ref(dtype, segments):
    """The C++ RoPE + layout pass: q and k equal rope_ref's bit for bit (fp32 maths in its order,
    rounded to the dtype), v copied, each group laid out [R, H, T, dh]; views of one qkv buffer and
    three separate tensors alike."""
    from helpers import backend_missing
    if backend_missing("cpp"):
        pytest.fail(f"the C++ extension should be built for the tests: {backend_missing('cpp')}")
    from stemgen.cpp_ext import _native, _qkv_rows
    from stemgen.kernels.attention import positions_of, rope_ref
    g = torch.Generator().manual_seed(5)
    H, dh = 3, 24
    N = sum(R * T for R, T in segments)
    qkv = torch.randn(N, 3, H, dh, generator=g).to(dtype)
    cos, sin = rope_tables(max(T for _, T in segments), dh)
    pos = positions_of(segments, "cpu")
    want = [rope_ref(qkv[:, 0], cos[pos], sin[pos]), rope_ref(qkv[:, 1], cos[pos], sin[pos]), qkv[:, 2]]
    fn = _native.rope_pack_bf16 if dtype == torch.bfloat16 else _native.rope_pack_f32
    for views, (q, k, v) in ((True, qkv.unbind(1)), (False, [t.clone() for t in qkv.unbind(1)])):
        rows = _qkv_rows(q, k, v)
        assert rows.shape == (N, 3 * H * dh)
        assert (rows.data_ptr() == qkv.data_ptr()) == views   # views of one buffer: used as is, no copy
        raw = rows.view(torch.uint16) if dtype == torch.bfloat16 else rows
        out = fn(raw.numpy(), cos.numpy(), sin.numpy(), torch.tensor(segments).numpy(), H, dtype == torch.bfloat16)
        out = [torch.from_numpy(o).view(dtype) if dtype == torch.bfloat16 else torch.from_numpy(o) for o in out]
        start = 0
        for R, T in segments:
            rows_g = slice(start, start + R * T)
            for got, exp in zip(out, want):
                grp = got[start * H * dh: (start + R * T) * H * dh].view(R, H, T, dh)
                assert torch.equal(grp, exp[rows_g].view(R, T, H, dh).transpose(1, 2))
            start += R * T


@pytest.mark.parametrize("segments", [[(3, 9), (2, 1), (1, 40)], [(2, 257)]])
def test_cpp_attention_fp32_equals_reference(segments):
    """fp32: the C++ variant's output equals attention_ref's bit for bit (RoPE bit-equal, then the
    same SDPA on the same values): the attention adds no difference of its own to the fp32 engine's."""
    from helpers import backend_missing
    if backend_missing("cpp"):
        pytest.fail(f"the C++ extension should be built for the tests: {backend_missing('cpp')}")
    from stemgen.cpp_ext import attention
    g = torch.Generator().manual_seed(2)
    N = sum(R * T for R, T in segments)
    q, k, v = torch.randn(N, 3, 4, 64, generator=g).unbind(1)
    cos, sin = rope_tables(max(T for _, T in segments), 64)
    assert torch.equal(attention(q, k, v, segments, cos, sin), attention_ref(q, k, v, segments, cos, sin))


def test_cpp_attention_bf16_against_fp32_reference():
    from helpers import backend_missing
    if backend_missing("cpp"):
        pytest.fail(f"the C++ extension should be built for the tests: {backend_missing('cpp')}")
    from stemgen.cpp_ext import attention
    g = torch.Generator().manual_seed(1)
    segments = [(2, 33), (1, 5)]
    q, k, v = torch.randn(71, 3, 2, 64, generator=g).to(torch.bfloat16).unbind(1)
    cos, sin = rope_tables(33, 64)
    want = attention_ref(q.float(), k.float(), v.float(), segments, cos, sin)
    got = attention(q, k, v, segments, cos, sin)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() <= 3e-2 * want.abs().max()


def test_cpp_rope_pack_refuses_bad_segments():
    from stemgen.cpp_ext import _native
    qkv = torch.zeros(10, 3 * 2 * 4)
    cos = torch.zeros(5, 2)
    with pytest.raises(ValueError, match="exceed"):
        _native.rope_pack_f32(qkv.numpy(), cos.numpy(), cos.numpy(), torch.tensor([[1, 10]]).numpy(), 2, False)
    with pytest.raises(ValueError, match="cover"):
        _native.rope_pack_f32(qkv.numpy(), cos.numpy(), cos.numpy(), torch.tensor([[1, 5]]).numpy(), 2, False)
    with pytest.raises(ValueError, match="cover"):   # R * T would wrap around int64 to 10 without the check
        _native.rope_pack_f32(qkv.numpy(), cos.numpy(), cos.numpy(),
                              torch.tensor([[(1 << 62) + 5, 4], [1, 2]]).numpy(), 2, False)
