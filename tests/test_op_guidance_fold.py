"""Guidance folded before the level head (kernels.guidance_fold): the head on the guidance rows'
weighted sum gives the same sampling distribution as the head on every row followed by the guidance,
over odd shapes and every guidance form; through whole StemGen and MAGNeT engines; and the sampler
reads the folded row with weight 1 (the tokens of whole generations against the unfolded engine)."""
import pytest
import torch

from stemgen.engine.config import SamplingConfig
from stemgen.engine.request import Request
from stemgen.engine.runner import run_requests
from stemgen.kernels import OPS
from stemgen.kernels.guidance_fold import fold_guidance_ref, guided
from stemgen.kernels.sampling import guided_logprobs
from stemgen.train import StemGenConfig

from helpers import load_engine_lm, make_model_dir, variants

WEIGHTS = {"multi (paper)": [3.0, 3.0, -5.0], "single": [10.0, -9.0], "magnet coef 3": [3.0, -2.0], "none": [1.0]}


@pytest.mark.parametrize("fn,dtype", variants("fold_guidance", (torch.float32, torch.bfloat16)))
@pytest.mark.parametrize("form", list(WEIGHTS))
@pytest.mark.parametrize("M,d,V", [(1, 8, 5), (7, 33, 41), (300, 256, 2048)])
def test_same_distribution_as_reference(fn, dtype, form, M, d, V):
    w = WEIGHTS[form]
    g = torch.Generator().manual_seed(M + d)
    rows = torch.randn(len(w), M, d, generator=g).to(dtype)
    head = torch.randn(V, d, generator=g) / d ** 0.5
    out = fn(rows, w)
    assert out.shape == (1, M, d) and out.dtype == rows.dtype
    got, want = guided(out, w, head), guided(fold_guidance_ref(rows, w), w, head)
    # fp32: the same sums in another order, normalised log-probabilities within 1e-5 of the logits'
    # scale; bf16: the folded sum is rounded to bf16 once (2^-8 of it)
    scale = sum(abs(x) for x in w) * (rows.float().abs().max() * head.abs().sum(-1).max())
    assert (got - want).abs().max() <= (1e-5 if dtype == torch.float32 else 2 ** -8) * scale


def test_dtypes_each_backend_folds():
    """The CPU folds fp32, the int8 path and bf16 (measured closer to fp32 than bf16 logits per row);
    CUDA folds fp32 only and says why not half precision."""
    for dtype in (torch.float32, torch.int8, torch.bfloat16):
        assert OPS["fold_guidance"].variants["cpp"].why_not(dtype) is None
    assert OPS["fold_guidance"].variants["cpp"].why_not(torch.float16) is not None
    assert OPS["fold_guidance"].variants["triton"].why_not(torch.float32) is None
    for dtype in (torch.bfloat16, torch.float16):
        assert "not measured on a GPU" in OPS["fold_guidance"].variants["triton"].why_not(dtype)


def _stemgen(tmp_path):
    cfg = StemGenConfig(d_model=64, n_heads=4, n_layers=2, codebook_size=37, ffn_multiple_of=16, n_channels=2)
    _, model_dir = make_model_dir(tmp_path, cfg)
    return load_engine_lm(model_dir)


@pytest.mark.parametrize("fn,dtype", variants("fold_guidance"))
@pytest.mark.parametrize("guidance", ["multi", "single"])
def test_stemgen_engine_folded_logits(fn, dtype, guidance, tmp_path):
    """Two requests of different lengths in one packed forward: each one's folded logits give its
    guided distribution, at the still-masked frames."""
    lm = _stemgen(tmp_path)
    lm.ops.fold_guidance = fn
    g = torch.Generator().manual_seed(1)
    reqs = []
    for T in (23, 40):
        ctx = torch.randint(0, 37, (1, lm.cfg.n_q, T), generator=g)
        r = Request(lm.cfg, ctx, torch.zeros(len(lm.cfg.cond_sizes), dtype=torch.long),
                    SamplingConfig(steps=(4, 2, 2, 2), guidance=guidance))
        r.admit(torch.device("cpu"))
        reqs.append(r)
    inputs = [r.rows(True) for r in reqs]
    weights = [r.guidance() for r in reqs]
    rows = lm.forward_requests(inputs)                 # every row's logits
    folded = lm.forward_requests(inputs, weights)
    for r, w, lr, lf in zip(reqs, weights, rows, folded):
        assert lr.shape[0] == len(w) and lf.shape == (1, *lr.shape[1:])
        want = torch.log_softmax(guided_logprobs(lr, torch.tensor(w)), -1)
        got = torch.log_softmax(lf[0], -1)
        assert (got - want).abs().max() <= 1e-5 * sum(abs(x) for x in w) * lr.abs().max()


@pytest.mark.parametrize("fn,dtype", variants("fold_guidance"))
def test_stemgen_generation_tokens_match_unfolded(fn, dtype, tmp_path):
    """Whole generations (multi CFG, 3 requests in one batch) with the folded head against the same
    engine with the head on every row: the sampler reads the folded row with weight 1. The
    distributions differ in the last bits only, so a token can flip only where its uniform lands
    on a code boundary: at least 99% of the tokens agree (all of them in practice)."""
    lm = _stemgen(tmp_path)
    g = torch.Generator().manual_seed(2)
    ctxs = [torch.randint(0, 37, (1, lm.cfg.n_q, T), generator=g) for T in (30, 45, 64)]
    out = {}
    for name, f in (("folded", fn), ("rows", fold_guidance_ref)):
        lm.ops.fold_guidance = f
        reqs = [Request(lm.cfg, c, torch.zeros(len(lm.cfg.cond_sizes), dtype=torch.long),
                        SamplingConfig(steps=(6, 3, 2, 2), seed=7)) for c in ctxs]
        out[name] = run_requests(lm, reqs)
    same = sum(int((a == b).sum()) for a, b in zip(out["folded"], out["rows"]))
    total = sum(a.numel() for a in out["rows"])
    assert same >= 0.99 * total, f"{same}/{total} tokens agree"


@pytest.mark.parametrize("fn,dtype", variants("fold_guidance"))
def test_magnet_engine_folded_logits(fn, dtype, tmp_path):
    """MAGNeT's CFG on logits (uncond + (cond - uncond) * coef) folded before its level head: the
    tempered distribution of the tiny fixture checkpoint's first step equals the unfolded one's."""
    from pathlib import Path

    from stemgen.engine.api import Engine
    from stemgen.weights_convert.magnet import convert_magnet
    from stemgen.weights_convert.pickles import PickleFile

    fix = Path(__file__).parent / "fixtures" / "magnet"
    model_dir = convert_magnet(PickleFile(fix / "state_dict.bin"), tmp_path / "m", None, None, fix / "t5-tiny")
    engine = Engine.from_pretrained(model_dir, device="cpu", dtype="float32")
    engine.lm.ops.fold_guidance = fn
    req = engine.text_request("a calm piano", frames=33)
    req.admit(torch.device("cpu"))
    inputs = [req.rows(True)]
    w = req.guidance()
    assert len(w) == 2 and w[0] == pytest.approx(10.0)      # the first step's annealed coefficient
    rows = engine.lm.forward_requests(inputs)[0]
    folded = engine.lm.forward_requests(inputs, [w])[0]
    assert folded.shape == (1, *rows.shape[1:])
    want = torch.log_softmax(rows[1] + (rows[0] - rows[1]) * w[0], -1)
    got = torch.log_softmax(folded[0], -1)
    assert (got - want).abs().max() <= 1e-5 * 19 * rows.abs().max()
