"""MAGNeT checkpoints in the engine: conversion of audiocraft's own export and logits equal to
audiocraft's LM forward (fixtures made by audiocraft 1.3.0 itself: tests/fixtures/magnet/make_fixtures.py,
run in a reference venv; CI needs no audiocraft).

The fixture: audiocraft's magnet_32khz solver config at a reduced width (d 64, 4 heads, 2 layers,
card 256, n_q 4, subcodes_context 5), exported as audiocraft's state_dict.bin (fp16 weights, real
xp.cfg), a random tiny T5 folder, and audiocraft's fp32 forward at each stage with the +-5 band applied
as a real mask (audiocraft's CPU path would apply a causal mask instead)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")

from stemgen.engine.config import ModelConfig  # noqa: E402
from stemgen.engine.magnet import TextMemory, TextRows  # noqa: E402
from stemgen.engine.model import load_lm  # noqa: E402
from stemgen.engine.text import TextEncoder  # noqa: E402
from stemgen.weights_convert.magnet import convert_magnet  # noqa: E402
from stemgen.weights_convert.pickles import PickleFile  # noqa: E402

FIX = Path(__file__).parent / "fixtures" / "magnet"
REF = load_file(str(FIX / "reference.safetensors"))
META = json.loads((FIX / "reference.json").read_text())
PROMPTS = META["prompts"]["rows"]          # two prompts and the CFG null row (None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("magnet") / "model"
    return convert_magnet(PickleFile(FIX / "state_dict.bin"), out, None, None, FIX / "t5-tiny")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def test_converted_config_matches_the_checkpoint(model_dir):
    cfg = ModelConfig.load(model_dir)
    s = META["checkpoint"]["sizes"]
    lm = cfg.lm
    assert (lm.arch, lm.d_model, lm.n_heads, lm.n_layers, lm.n_q, lm.codebook_size, lm.band, lm.span_len) == \
        ("magnet", s["dim"], s["num_heads"], s["num_layers"], s["n_q"], s["card"], s["subcodes_context"], 3)
    assert lm.ffn_hidden == 4 * s["dim"] and lm.text_dim == META["checkpoint"]["t5"]["d_model"]
    assert lm.segment_frames == 500 and cfg.window == 500
    assert cfg.sampling.steps == (20, 10, 10, 10) and cfg.sampling.guidance == "magnet"
    assert (cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.max_cfg_coef) == (3.0, 0.9, 10.0)
    assert (model_dir / "text_encoder" / "model.safetensors").is_file()


def test_t5_outputs_equal_the_fixture(model_dir):
    enc = TextEncoder(model_dir / "text_encoder")
    for i, prompt in enumerate(PROMPTS[:2]):
        assert torch.equal(enc.tokens(prompt), REF[f"b1_row{i}_t5_input_ids"])
        got = enc.encode(prompt)
        assert rel_err(got, REF[f"b1_row{i}_t5_last_hidden_state"][0]) < 1e-5


@pytest.mark.parametrize("stage", range(4))
def test_logits_equal_audiocraft_each_stage(model_dir, stage):
    """Each prompt alone (its own length, as audiocraft batch 1) and the null row, fp32: the active
    level's head within 1e-4 of the logits' scale; levels > stage are MASK as audiocraft feeds them."""
    cfg = ModelConfig.load(model_dir)
    lm = load_lm(model_dir / cfg.weights["lm"], cfg.lm)
    enc = TextEncoder(model_dir / "text_encoder")
    codes = REF[f"stage{stage}_input"]
    window = None if stage == 0 else cfg.lm.band
    for i, prompt in enumerate(PROMPTS):
        text = lm.project_text(enc.encode(prompt)) if prompt is not None else None
        rows = TextRows(text, 1 if text is not None else 0, window)
        got = lm.forward_requests([(codes[i][None, None], rows, stage, None)])[0][0]
        want = REF[f"b1_stage{stage}_row{i}_logits"][0, 0]
        assert rel_err(got, want) <= 1e-4, (stage, i)


def test_null_row_has_no_cross_attention_work(model_dir):
    """The unconditioned row skips cross-attention; audiocraft's all-zero memory gives the same logits."""
    cfg = ModelConfig.load(model_dir)
    lm = load_lm(model_dir / cfg.weights["lm"], cfg.lm)
    codes = REF["stage0_input"][2][None, None]
    skipped = lm.forward_requests([(codes, TextRows(None, 0, None), 0, None)])[0]
    zero = TextMemory(torch.zeros(4, cfg.lm.d_model))   # output_proj(T5("")) * zeroed mask, as audiocraft's
    full = lm.forward_requests([(codes, TextRows(zero, 1, None), 0, None)])[0]
    assert torch.equal(skipped, full)


def test_batching_prompts_of_different_lengths_changes_nothing(model_dir):
    """audiocraft pads a batch's prompts to the longest and its padded keys take softmax mass (the
    fixture shows its row 1 moving by ~0.4 between batch 1 and batch 3); the engine's requests each
    keep their own memory, so packed together they give their solo logits."""
    assert max(META["checks"]["batch_vs_b1_max_abs_diff"]["0"]) > 0.1   # audiocraft's own dependence
    cfg = ModelConfig.load(model_dir)
    lm = load_lm(model_dir / cfg.weights["lm"], cfg.lm)
    enc = TextEncoder(model_dir / "text_encoder")
    codes = REF["stage1_input"]
    reqs = [(codes[i][None, None].expand(2, 1, -1, -1), TextRows(lm.project_text(enc.encode(p)), 1, 5), 1, None)
            for i, p in enumerate(PROMPTS[:2])]
    together = lm.forward_requests(reqs)
    for r, t in zip(reqs, together):
        alone = lm.forward_requests([r])[0]
        assert torch.allclose(alone, t, atol=1e-5, rtol=1e-5)


def run_recorded(lm, req):
    """Run one request to the end with the engine's runner pieces, recording the LM input (level
    tokens as fed to the forward) at every step."""
    from stemgen.engine.runner import Runner
    runner = Runner(lm, head_subset=True)
    req.admit(torch.device("cpu"))
    seen = []
    while not req.finished:
        req.skip_idle_steps()
        seen.append(req.tokens.clone())
        runner.execute([req])
        assert req.error is None, req.error
    return seen


@pytest.mark.parametrize("name", ["greedy_nonoverlap", "greedy_stride1", "greedy_nonoverlap_prompt",
                                  "greedy_stride1_prompt"])
def test_decoding_equals_audiocraft_step_by_step(model_dir, name):
    """audiocraft's generate (use_sampling=False: argmax of the annealed-CFG logits; confidence from the
    tempered distribution) against the engine's MAGNeT request with greedy sampling (top_p 0, top_k 1),
    both span arrangements, with and without a 10-frame prompt. Compared: the LM input of every one of
    the 50 forwards (which frames are masked, which tokens were kept) and the final tokens, for the
    batch's first prompt (the longest: audiocraft pads the other one, which changes its logits)."""
    from stemgen.engine.api import Engine
    gen = META["generation"][name]
    engine = Engine.from_pretrained(model_dir, device="cpu", dtype="float32")
    T = gen["tokens_shape"][-1]
    target = None
    if gen["prompt_frames"]:
        target = torch.full((4, T), engine.mask_id, dtype=torch.int64)
        target[:, : gen["prompt_frames"]] = REF["gen_prompt"][0]
    p = gen["params"]
    req = engine.text_request(PROMPTS[0], frames=T, target=target, steps=tuple(p["decoding_steps"]),
                              span_arrangement=p["span_arrangement"], top_p=0.0, top_k=1,
                              temperature=p["temp"], max_cfg_coef=p["max_cfg_coef"], min_cfg_coef=p["min_cfg_coef"])
    seen = run_recorded(engine.lm, req)
    want = REF[f"gen_{name}_inputs"][:, 0].long()
    assert len(seen) == want.shape[0] == 50
    for call, (got, ref) in enumerate(zip(seen, want)):
        assert torch.equal(got, ref), f"step {call} (level {gen['stage_per_call'][call]}) differs"
    assert torch.equal(req.tokens, REF[f"gen_{name}_tokens"][0])
