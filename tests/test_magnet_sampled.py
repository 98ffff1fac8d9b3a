"""MAGNeT sampled decoding equal to audiocraft 1.3.0's, step by step.

The fixtures (tests/fixtures/magnet/make_fixtures.py, ``uniform_runs``) are audiocraft's own
``_generate_magnet`` with default sampling (temp 3.0 annealed, top_p 0.9, CFG 10 -> 1, steps
[20, 10, 10, 10], span scoring 'max'), each prompt alone (batch 1), where
``audiocraft.utils.utils.multinomial`` draws by inverse CDF with the engine's counter-based uniforms
(kernels.rng: stage s, step t, frame n -> uniform(step_key(seed, s, t, STREAM_SAMPLE), n)) instead of
torch.multinomial. With the same uniforms the engine must make the same draws: compared are the LM
input of every one of the 50 forwards and the final tokens."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")

from stemgen.weights_convert.magnet import convert_magnet  # noqa: E402
from stemgen.weights_convert.pickles import PickleFile  # noqa: E402

from test_magnet import run_recorded  # noqa: E402

FIX = Path(__file__).parent / "fixtures" / "magnet"
REF = load_file(str(FIX / "reference.safetensors"))
META = json.loads((FIX / "reference.json").read_text())
NAMES = [f"uniform_{arr}{pr}_row{i}" for arr in ("nonoverlap", "stride1") for pr in ("", "_prompt") for i in (0, 1)]


def _engine(tmp_path_factory):
    from stemgen.engine.api import Engine
    out = tmp_path_factory.mktemp("magnet_sampled") / "model"
    model_dir = convert_magnet(PickleFile(FIX / "state_dict.bin"), out, None, None, FIX / "t5-tiny")
    return Engine.from_pretrained(model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return _engine(tmp_path_factory)


@pytest.fixture(scope="module")
def triton_engine(tmp_path_factory):
    """The same model with the Triton sampling kernel (under the interpreter without a GPU)."""
    from stemgen.kernels import OPS
    from helpers import backend_missing
    if backend_missing("triton"):
        pytest.skip(backend_missing("triton"))
    eng = _engine(tmp_path_factory)
    eng.lm.ops.magnet_sample = OPS["magnet_sample"].variants["triton"].load()
    return eng


def test_fixture_runs_are_the_default_sampling():
    for name in NAMES:
        p = META["generation"][name]["params"]
        assert p["use_sampling"] and (p["temp"], p["top_p"], p["top_k"]) == (3.0, 0.9, 0)
        assert (p["max_cfg_coef"], p["min_cfg_coef"], p["decoding_steps"]) == (10.0, 1.0, [20, 10, 10, 10])
        assert p["anneal_temp"] and p["span_scoring"] == "max"


@pytest.mark.parametrize("name", NAMES)
def test_sampled_decoding_equals_audiocraft_step_by_step(engine, name):
    """The engine's MAGNeT request with its default sampling (top_p 0.9) and the fixture's seed against
    audiocraft's generate with the same uniforms: every forward's input and the final tokens."""
    check_against_audiocraft(engine, name)


@pytest.mark.parametrize("name", ["uniform_stride1_prompt_row0"])   # the interpreter's speed: one run
def test_triton_sampler_decoding_equals_audiocraft(triton_engine, name):
    check_against_audiocraft(triton_engine, name)


def check_against_audiocraft(engine, name):
    gen = META["generation"][name]
    p = gen["params"]
    T = gen["tokens_shape"][-1]
    target = None
    if gen["prompt_frames"]:
        target = torch.full((4, T), engine.mask_id, dtype=torch.int64)
        target[:, : gen["prompt_frames"]] = REF["gen_prompt"][gen["prompt_row"]]
    req = engine.text_request(gen["prompt_text"], frames=T, target=target, steps=tuple(p["decoding_steps"]),
                              span_arrangement=p["span_arrangement"], seed=gen["seed"])
    s = req.sampling
    assert (s.top_p, s.top_k, s.temperature, s.max_cfg_coef, s.min_cfg_coef) == \
        (p["top_p"], p["top_k"], p["temp"], p["max_cfg_coef"], p["min_cfg_coef"])
    seen = run_recorded(engine.lm, req)
    want = REF[f"gen_{name}_inputs"][:, 0].long()
    assert len(seen) == want.shape[0] == 50
    for call, (got, ref) in enumerate(zip(seen, want)):
        if not torch.equal(got, ref):
            level = gen["stage_per_call"][call]
            step = call - gen["stage_per_call"].index(level)
            frames = (got[level] != ref[level]).nonzero()[:, 0].tolist()
            pytest.fail(f"forward {call} (level {level}, step {step}) differs at level-{level} frames {frames}"
                        f" (other levels equal: {torch.equal(got[:level], ref[:level])})")
    assert torch.equal(req.tokens, REF[f"gen_{name}_tokens"][0])
