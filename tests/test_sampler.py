"""Sampler (SPEC section 4): schedule, fixed tokens, ranking, seeds, guidance maths, distribution."""

import numpy as np
import pytest
import torch
from scipy import stats

from stemgen import cpp_ext
from stemgen.engine.backend import Ops
from stemgen.engine.config import LMConfig, SamplingConfig
from stemgen.engine.request import Request, guidance_rows
from stemgen.engine.runner import run_requests
from stemgen.kernels.sampling import guided_logprobs
from stemgen.train import StemGenConfig

from helpers import load_engine_lm, make_model_dir


class FakeLM:
    """Returns fixed logits per guidance row (same at every position) and records its inputs."""

    def __init__(self, cfg: LMConfig, row_logits: torch.Tensor | None = None, seed: int = 0, ops=None):
        self.cfg = cfg
        self.ops = ops or Ops()
        self.device = torch.device("cpu")
        g = torch.Generator().manual_seed(seed)
        self.row_logits = row_logits if row_logits is not None else torch.randn(3, cfg.codebook_size, generator=g)
        self.calls = []  # (level, tokens, conditions)

    def __call__(self, tokens, conditions, level):
        self.calls.append((level, tokens.clone(), conditions.clone()))
        R, _, _, T = tokens.shape
        return self.row_logits[:R, None, :].expand(R, T, -1).clone()

    def forward_requests(self, requests, guidance=None):  # the engine LM's batched interface (never folds)
        out = []
        for tokens, conds, level, positions in requests:
            logits = self(tokens, conds, level)
            out.append(logits if positions is None else logits[:, positions])
        return out


def generate_tokens(model, context, conditions, sampling, target=None):
    """One request run to completion (the scheduler with a batch of one)."""
    return run_requests(model, [Request(model.cfg, context, conditions, sampling, target=target)])[0]


def lm_cfg(V=16, Q=4, C=2, cond=(5,)):
    return LMConfig(d_model=8 * C, n_heads=2, n_layers=0, n_q=Q, codebook_size=V, n_channels=C,
                    cond_sizes=cond, ffn_hidden=8)


def cos_rule(t, S, N):  # independent restatement of the SPEC schedule
    return 0 if t == S - 1 else int(np.floor(np.cos(np.pi / 2 * (t + 1) / S) * N))


def run(model, T=50, target=None, **kw):
    cfg = model.cfg
    ctx = torch.randint(0, cfg.codebook_size, (cfg.n_channels - 1, cfg.n_q, T), generator=torch.Generator().manual_seed(7))
    s = SamplingConfig(**{"steps": (8, 5, 3, 1), **kw})
    return generate_tokens(model, ctx, torch.tensor([2]), s, target=target), ctx


def test_schedule_counts_and_full_unmask():
    model = FakeLM(lm_cfg())
    steps = (8, 5, 3, 1)
    out, _ = run(model, T=50, steps=steps)
    assert (out < model.cfg.codebook_size).all(), "everything unmasked at the end"
    seen = {}
    for level, tokens, _ in model.calls:
        seen.setdefault(level, []).append(int((tokens[0, -1, level] == model.cfg.mask_id).sum()))
    for q, S in enumerate(steps):
        before = [50] + [cos_rule(t, S, 50) for t in range(S - 1)]  # masked before step t
        # a step whose schedule unmasks nothing runs no forward
        expected = [m for t, m in enumerate(before) if cos_rule(t, S, 50) < m]
        assert seen[q] == expected, (q, seen[q], expected)


def test_levels_above_are_masked_below_fixed_and_rows_follow_guidance():
    model = FakeLM(lm_cfg())
    out, ctx = run(model, T=20)
    cfg = model.cfg
    for level, tokens, conds in model.calls:
        assert tokens.shape[0] == 3
        tgt = tokens[:, -1]
        assert (tgt[:, level + 1:] == cfg.mask_id).all()
        assert (tgt[:, :level] == out[:level]).all()
        assert (tokens[0, :-1] == ctx).all() and (tokens[1:, :-1] == cfg.null_id).all()
        assert conds[:, 0].tolist() == [cfg.cond_sizes[0], 2, cfg.cond_sizes[0]]


def test_fixed_tokens_never_change():
    cfg = lm_cfg()
    T = 40
    g = torch.Generator().manual_seed(3)
    target = torch.randint(0, cfg.codebook_size, (cfg.n_q, T), generator=g)
    hole = torch.rand(cfg.n_q, T, generator=g) < 0.5
    target[hole] = cfg.mask_id
    model = FakeLM(cfg)
    out, _ = run(model, T=T, target=target.clone())
    assert (out[~hole] == target[~hole]).all()
    assert (out < cfg.codebook_size).all()
    for level, tokens, _ in model.calls:  # fixed tokens of the decoded level are visible as given
        fixed = ~hole[level]
        assert (tokens[0, -1, level][fixed] == target[level][fixed]).all()


def test_causal_ranking_unmasks_in_time_order():
    model = FakeLM(lm_cfg())
    run(model, T=30, w_confidence=0.0, w_random=0.0, w_causal=0.1)
    for level, tokens, _ in model.calls:
        m = (tokens[0, -1, level] == model.cfg.mask_id).int()
        first = int(m.argmax()) if m.any() else 30
        assert m[first:].all(), f"masked positions are not a suffix: {m.tolist()}"


def test_seed_determinism_on_real_model(tmp_path):
    cfg = StemGenConfig(d_model=32, n_heads=2, n_layers=1, codebook_size=24, ffn_multiple_of=16)
    _, d = make_model_dir(tmp_path, cfg)
    lm = load_engine_lm(d)
    ctx = torch.randint(0, 24, (1, 4, 25), generator=torch.Generator().manual_seed(0))
    a, b, c = (generate_tokens(lm, ctx, torch.tensor([3]), SamplingConfig(steps=(4, 2, 2, 1), seed=seed))
               for seed in (1, 1, 2))
    assert torch.equal(a, b)
    assert (a != c).float().mean() > 0.3


def test_guided_distribution_matches_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 3
    la, li = 3.0, 2.5
    s = SamplingConfig(cfg_context=la, cfg_instrument=li)
    got = guided_logprobs(logits, torch.tensor(s.guidance_weights()))
    lp = logits.double().numpy()
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    want = la * lp[0] + li * lp[1] + (1 - la - li) * lp[2]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    s1 = SamplingConfig(guidance="single", cfg_scale=4.0)
    got1 = guided_logprobs(logits[:2], torch.tensor(s1.guidance_weights()))
    np.testing.assert_allclose(got1.numpy(), 4.0 * lp[0] + (1 - 4.0) * lp[1], rtol=1e-5, atol=1e-5)


def test_guidance_rows_single_and_none():
    cfg = lm_cfg(C=3, cond=(5, 2))
    ctx = torch.zeros(2, 4, 6, dtype=torch.long)
    tgt = torch.full((4, 6), cfg.mask_id)
    cond = torch.tensor([1, 0])
    toks, conds = guidance_rows(ctx, tgt, cond, "single", cfg)
    assert toks.shape == (2, 3, 4, 6) and conds.tolist() == [[1, 0], [5, 2]]
    assert (toks[1, :2] == cfg.null_id).all() and (toks[0, :2] == 0).all()
    toks, conds = guidance_rows(ctx, tgt, cond, "none", cfg)
    assert toks.shape[0] == 1 and conds.tolist() == [[1, 0]]


BACKENDS = {"reference": Ops(), "cpp": Ops(guide_sample_rank=cpp_ext.guide_sample_rank)}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("guidance,temperature", [("multi", 1.0), ("single", 0.7), ("none", 1.3)])
def test_samples_follow_guided_distribution(guidance, temperature, backend):
    """Chi-square goodness of fit: one step decodes all T positions of level 0 from the guided
    distribution (fixed logits per row), so token counts must follow softmax(guided / temperature)."""
    V, T = 8, 20000
    cfg = lm_cfg(V=V, Q=1)
    rows = torch.tensor([[1.0, 0.2, -0.5, 0.0, 0.8, -1.0, 0.3, 0.1],
                         [0.1, 0.9, 0.0, -0.3, 0.2, 0.4, -0.8, 0.0],
                         [0.0, 0.0, 0.5, 0.5, -0.5, 0.0, 0.2, -0.2]])
    model = FakeLM(cfg, rows, ops=BACKENDS[backend])
    s = SamplingConfig(steps=(1,), guidance=guidance, cfg_context=1.5, cfg_instrument=1.2, cfg_scale=2.0,
                       temperature=temperature, seed=11)
    ctx = torch.zeros(1, 1, T, dtype=torch.long)
    out = generate_tokens(model, ctx, torch.tensor([0]), s)[0]
    w = torch.tensor(s.guidance_weights())
    p = (guided_logprobs(rows[: len(w), None, :], w)[0] / temperature).softmax(-1).double().numpy()
    p /= p.sum()
    counts = np.bincount(out.numpy(), minlength=V)
    res = stats.chisquare(counts, p * T)
    assert res.pvalue > 1e-3, (counts, p * T, res)
    # and a wrong distribution (unguided) is rejected: the test has power
    p_wrong = rows[0].double().softmax(-1).numpy()
    assert stats.chisquare(counts, p_wrong * T).pvalue < 1e-6


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("temperature", [0.0, 1e-4])
def test_temperature_to_zero_is_argmax(temperature, backend):
    cfg = lm_cfg(V=16)
    g = torch.Generator().manual_seed(5)

    class PerPosition(FakeLM):
        def __call__(self, tokens, conditions, level):
            R, T = tokens.shape[0], tokens.shape[-1]
            return self.table[:R, :T]

    model = PerPosition(cfg, ops=BACKENDS[backend])
    model.table = torch.randn(3, 30, 16, generator=g) * 2
    s = SamplingConfig(steps=(3, 3, 3, 3), temperature=temperature)
    ctx = torch.zeros(1, 4, 30, dtype=torch.long)
    out = generate_tokens(model, ctx, torch.tensor([1]), s)
    want = guided_logprobs(model.table, torch.tensor(s.guidance_weights())).argmax(-1)
    assert (out == want[None]).all()


def test_bad_requests_are_clear():
    model = FakeLM(lm_cfg())
    ctx = torch.zeros(1, 4, 10, dtype=torch.long)
    with pytest.raises(ValueError, match="context tokens must have shape"):
        generate_tokens(model, torch.zeros(4, 10, dtype=torch.long), torch.tensor([1]), SamplingConfig(steps=(1,) * 4))
    with pytest.raises(ValueError, match="one step count per level"):
        generate_tokens(model, ctx, torch.tensor([1]), SamplingConfig(steps=(2, 2)))
    with pytest.raises(ValueError, match="condition 0 is 9"):
        generate_tokens(model, ctx, torch.tensor([9]), SamplingConfig(steps=(1,) * 4))
    with pytest.raises(ValueError, match="context tokens must be codes"):
        generate_tokens(model, ctx + 99, torch.tensor([1]), SamplingConfig(steps=(1,) * 4))
