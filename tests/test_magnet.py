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
from stemgen.engine.architectures import load_lm  # noqa: E402
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


@pytest.fixture(scope="module")
def full_model(tmp_path_factory):
    """The fixture checkpoint converted with a tiny random codec, through the CLI as a user would."""
    from helpers import tiny_audiocraft_codec
    from typer.testing import CliRunner

    from stemgen.cli import app
    tmp = tmp_path_factory.mktemp("magnet_cli")
    codec = tiny_audiocraft_codec(tmp / "compression_state_dict.bin")
    out = tmp / "model"
    res = CliRunner().invoke(app, ["convert", "--lm", str(FIX / "state_dict.bin"), "--codec", str(codec),
                                   "--text-encoder", str(FIX / "t5-tiny"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def cli(*args):
    from typer.testing import CliRunner

    from stemgen.cli import app
    return CliRunner().invoke(app, [str(a) for a in args])


FAST = ["--steps", "3,2,1,1"]


def test_generate_text_cli_end_to_end(full_model, tmp_path):
    import soundfile as sf
    res = cli("generate", "--model", full_model, "--text", "90s rock with heavy drums", "--seconds", 2,
              "--out", tmp_path / "song.wav", "--variations", 2, "--seed", 3, *FAST)
    assert res.exit_code == 0, res.output
    a, sr = sf.read(tmp_path / "song_1.wav")
    b, _ = sf.read(tmp_path / "song_2.wav")
    assert sr == 32000 and len(a) == len(b) == 64000 and not (a == b).all()
    # the same seed is the same file; variation 2 is the run with seed + 1
    res = cli("generate", "--model", full_model, "--text", "90s rock with heavy drums", "--seconds", 2,
              "--out", tmp_path / "again.wav", "--seed", 4, *FAST)
    assert res.exit_code == 0, res.output
    assert (sf.read(tmp_path / "again.wav")[0] == b).all()


def test_generate_text_continuation_inpainting_and_long_form(full_model, tmp_path):
    """--keep continues a prompt (its frames fixed in every level), --regenerate inpaints ranges of a
    take, --seconds beyond the segment runs window by window: tokens checked through the API."""
    import numpy as np

    from stemgen.engine.api import Engine
    engine = Engine.from_pretrained(full_model, device="cpu", dtype="float32")
    sr = 32000
    take = 0.3 * np.sin(2 * np.pi * 220 * np.arange(3 * sr) / sr)[None].astype(np.float32)
    _, codes = engine.prepare_audio(take, sr)
    codes = codes[0]
    kw = dict(steps=(3, 2, 1, 1), sampling=None)
    cont = engine.generate_text("calm piano", seconds=4.0, take=take[:, : sr], take_rate=sr, **kw)[0]
    assert torch.equal(cont.tokens[:, :50], codes[:, :50]) and cont.tokens.shape[-1] == 200
    inpaint = engine.generate_text("calm piano", take=take, take_rate=sr, regions=[(1.0, 2.0)], **kw)[0]
    assert torch.equal(inpaint.tokens[:, :50], codes[:, :50]) and torch.equal(inpaint.tokens[:, 100:], codes[:, 100:])
    assert not torch.equal(inpaint.tokens[:, 50:100], codes[:, 50:100])
    long = engine.generate_text("calm piano", seconds=25.0, **kw)[0]   # segment 10 s: 3 windows
    assert long.tokens.shape[-1] == 1250 and (long.tokens < engine.config.lm.codebook_size).all()
    assert long.stem.shape[-1] == 25 * sr


def test_prompt_file_is_one_batch_equal_to_single_runs(full_model, tmp_path):
    import soundfile as sf
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("90s rock with heavy drums\n\ncalm piano\n")
    res = cli("generate", "--model", full_model, "--text", f"@{prompts}", "--seconds", 1, "--out",
              tmp_path / "batch", *FAST)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "batch").iterdir()) == ["1.wav", "2.wav"]
    res = cli("generate", "--model", full_model, "--text", "calm piano", "--seconds", 1, "--out",
              tmp_path / "single.wav", *FAST)
    assert res.exit_code == 0, res.output
    assert (sf.read(tmp_path / "batch" / "2.wav")[0] == sf.read(tmp_path / "single.wav")[0]).all()


def test_batched_text_requests_equal_solo_runs(full_model):
    """fp32 batch invariance: MAGNeT requests of different prompts, lengths and settings packed in one
    scheduler give each one the tokens of its solo run."""
    from stemgen.engine.api import Engine
    from stemgen.engine.runner import run_requests
    engine = Engine.from_pretrained(full_model, device="cpu", dtype="float32")
    specs = [("90s rock with heavy drums", 60, "nonoverlap", 1), ("calm piano", 47, "stride1", 2),
             ("calm piano", 60, "nonoverlap", 3)]
    make = lambda p, T, arr, seed: engine.text_request(p, T, steps=(4, 2, 2, 1), span_arrangement=arr, seed=seed)  # noqa: E731
    solo = [run_requests(engine.runner, [make(*s)])[0] for s in specs]
    together = run_requests(engine.runner, [make(*s) for s in specs])
    for a, b in zip(solo, together):
        assert torch.equal(a, b)


@pytest.mark.parametrize("args,needle", [
    (["--text", ""], "prompt is empty"),
    (["--text", "x" * 5000], "at most 4096"),
    (["--text", "ok", "ctx.wav"], "no context"),
    (["--text", "ok", "-i", "bass"], "no context"),
    (["--text", "ok", "--span-arrangement", "zigzag"], "span_arrangement"),
    (["--text", "@/dev/zero"], "the prompt file is larger than 1 MB"),   # a device: no size to check first
    (["--text", "ok", "--seed", str((1 << 63) - 1), "--variations", "2"], "past the largest (2^63 - 1)"),
])
def test_text_cli_bad_input_is_one_line(full_model, tmp_path, args, needle):
    res = cli("generate", "--model", full_model, "--out", tmp_path / "o.wav", *args)
    assert res.exit_code != 0 and needle in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "o.wav").exists()


def test_context_on_magnet_and_text_on_stemgen_say_which_model_takes_what(full_model, tmp_path):
    import numpy as np
    import soundfile as sf
    sf.write(tmp_path / "ctx.wav", np.zeros(32000, dtype=np.float32), 32000)
    res = cli("generate", tmp_path / "ctx.wav", "-i", "bass", "--model", full_model, "--out", tmp_path / "o.wav")
    assert res.exit_code != 0 and "MAGNeT model: it takes a text prompt" in res.output, res.output
    res = cli("generate", "--text", "rock", "--model", "demo", "--out", tmp_path / "o.wav")
    assert res.exit_code != 0 and "StemGen model" in res.output, res.output


def test_info_shows_the_model_kind_and_defaults(full_model):
    res = cli("info", full_model, "--json")
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.stdout)["config"]
    assert cfg["lm"]["arch"] == "magnet" and cfg["sampling"]["guidance"] == "magnet"
    res = cli("info", full_model)
    assert res.exit_code == 0 and "MAGNeT" in res.output and "nonoverlap" in res.output, res.output


@pytest.mark.parametrize("sampling, want", [(None, 3.0), ({"steps": [2, 1, 1, 1]}, 3.0), ({"temperature": 1.5}, 1.5)])
def test_magnet_config_without_guidance_takes_magnets_defaults(model_dir, tmp_path, sampling, want):
    """A MAGNeT config.json with no sampling section, or one without guidance, loads with MAGNeT's own
    defaults beneath what it gives (not StemGen's, whose guidance it would refuse)."""
    from stemgen.engine.config import ModelConfig
    d = json.loads((Path(model_dir) / "config.json").read_text())
    if sampling is None:
        d.pop("sampling")
    else:
        d["sampling"] = sampling
    cfg = ModelConfig.from_dict(d)
    assert cfg.sampling.guidance == "magnet" and cfg.sampling.temperature == want and cfg.sampling.top_p == 0.9


def fixture_checkpoint():
    return torch.load(FIX / "state_dict.bin", map_location="cpu", weights_only=True)


def convert_cli(tmp_path, lm, text_encoder=FIX / "t5-tiny"):
    args = ["convert", "--lm", lm, "--out", tmp_path / "out"]
    return cli(*args, *(["--text-encoder", text_encoder] if text_encoder else []))


def saved(tmp_path, ck, name="state_dict.bin"):
    torch.save(ck, tmp_path / name)
    return tmp_path / name


def edit_cfg(ck, **changes):
    import yaml
    root = yaml.safe_load(ck["xp.cfg"])
    for path, value in changes.items():
        node = root
        *parents, last = path.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    return {**ck, "xp.cfg": yaml.safe_dump(root)}


def wide_t5(tmp_path):
    from transformers import AutoTokenizer, T5Config, T5EncoderModel
    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(d_model=48, d_kv=8, num_heads=2, num_layers=1, d_ff=32, vocab_size=81))
    model.save_pretrained(tmp_path / "t5-wide")
    AutoTokenizer.from_pretrained(FIX / "t5-tiny").save_pretrained(tmp_path / "t5-wide")
    return tmp_path / "t5-wide"


@pytest.mark.parametrize("case,needle", [
    ("no_text_encoder", "pass its T5 text encoder with --text-encoder"),
    ("wide_t5", "T5 encoder's width is 48"),
    ("musicgen", "MusicGen is not supported; MAGNeT is"),
    ("truncated", "cannot be read as a PyTorch checkpoint"),
    ("leftover_key", "unexpected tensor 'transformer.layers.0.self_attn.in_proj_bias'"),
    ("missing_key", "missing tensor 'transformer.layers.1.cross_attention.in_proj_weight'"),
    ("huge_dim", "transformer_lm.dim"),
    ("nan_heads", "xp.cfg transformer_lm.num_heads: must be an integer"),
    ("bias", "transformer_lm.bias_attn is 'True'; the engine's MAGNeT needs False"),
    ("yaml_tag", "xp.cfg"),
])
def test_bad_checkpoints_are_one_line_and_write_nothing(tmp_path, case, needle):
    ck, t5 = fixture_checkpoint(), FIX / "t5-tiny"
    if case == "no_text_encoder":
        t5 = None
    elif case == "wide_t5":
        t5 = wide_t5(tmp_path)
    elif case == "musicgen":
        ck = edit_cfg(ck, lm_model="transformer_lm")
    elif case == "leftover_key":
        ck["best_state"] = {**ck["best_state"], "transformer.layers.0.self_attn.in_proj_bias": torch.zeros(192)}
    elif case == "missing_key":
        ck["best_state"] = {k: v for k, v in ck["best_state"].items()
                            if k != "transformer.layers.1.cross_attention.in_proj_weight"}
        ck["best_state"].pop("transformer.layers.1.cross_attention.out_proj.weight")
    elif case == "huge_dim":
        ck = edit_cfg(ck, transformer_lm__dim=1 << 40)
    elif case == "nan_heads":
        ck = edit_cfg(ck, transformer_lm__num_heads=float("nan"))
    elif case == "bias":
        ck = edit_cfg(ck, transformer_lm__bias_attn=True)
    elif case == "yaml_tag":
        ck = {**ck, "xp.cfg": "lm_model: !!binary aGVsbG8=\ntransformer_lm: {dim: !!python/name:os.system }\n"}
    src = saved(tmp_path, ck)
    if case == "truncated":
        src.write_bytes(src.read_bytes()[:5000])
    res = convert_cli(tmp_path, src, t5)
    assert res.exit_code != 0 and needle in res.output, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_server_text_jobs_batch_across_clients_and_equal_the_cli(full_model, tmp_path):
    """`stemgen serve` with a MAGNeT model: JSON text jobs from several clients share the scheduler's
    forwards; each job's audio equals the CLI's for the same prompt and seed."""
    import io
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import soundfile as sf
    import uvicorn
    from test_serve import free_port, wait, wait_up

    from stemgen.engine.api import Engine
    from stemgen.serve import Limits, create_app
    engine = Engine.from_pretrained(full_model, device="cpu", dtype="float32")
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, Limits(max_seconds=20, max_sync_seconds=5)),
                                        host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_up(base + "/healthz")
        prompts = ["90s rock with heavy drums", "calm piano", "calm piano"]

        def one(i):
            r = httpx.post(base + "/v1/jobs", json={"text": prompts[i], "seconds": 1, "steps": [3, 2, 1, 1],
                                                    "seed": i}, timeout=30)
            assert r.status_code == 202, r.text
            st = wait(base, r.json()["id"])
            assert st["status"] == "done", st
            return httpx.get(f"{base}/v1/jobs/{st['id']}/audio", timeout=30).content

        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(one, range(3)))
        assert engine.service.stats["steps"] < 3 * 7      # the three jobs shared forwards
        res = cli("generate", "--model", full_model, "--text", prompts[1], "--seconds", 1, "--seed", 1, "--out",
                  tmp_path / "o.wav", "--dtype", "float32", *FAST)
        assert res.exit_code == 0, res.output
        assert sf.read(tmp_path / "o.wav")[0].tolist() == sf.read(io.BytesIO(results[1]))[0].tolist()
        sync = httpx.post(base + "/v1/generate", json={"text": "calm piano", "seconds": 1, "steps": [3, 2, 1, 1],
                                                       "seed": 1}, timeout=60)
        assert sync.status_code == 200 and sync.content == results[1]
        for body, needle in [({"text": ""}, "empty"), ({"seconds": 1}, '"text"'), ({"text": "x", "seconds": 99},
                             "seconds must be"), ({"text": "x", "top_p": 2}, "top_p"), ({"text": "x", "nope": 1},
                             "unknown field"), ([1, 2], "JSON object")]:
            r = httpx.post(base + "/v1/jobs", json=body, timeout=30)
            assert r.status_code == 400 and needle in r.json()["error"], (body, r.text)
        r = httpx.post(base + "/v1/jobs", files={"file": ("c.wav", b"RIFF", "audio/wav")}, data={"instrument": "bass"})
        assert r.status_code == 400 and "MAGNeT model" in r.json()["error"]
        assert httpx.get(base + "/readyz").json()["kind"] == "magnet"
    finally:
        srv.should_exit = True
        thread.join(30)


def test_server_text_job_past_the_segment_is_windowed_as_the_cli(full_model, tmp_path):
    """A JSON text job longer than the model's segment (10 s) runs window by window on the server,
    each window a request of its own, and writes the CLI's bytes."""
    import io

    import httpx
    import soundfile as sf
    from test_serve import serving, wait

    from stemgen.engine.api import Engine
    engine = Engine.from_pretrained(full_model, device="cpu", dtype="float32")
    widths = []
    real_submit = engine.service.submit
    engine.service.submit = lambda req: (widths.append(req.T), real_submit(req))[1]
    with serving(engine, max_seconds=20) as (base, _):
        r = httpx.post(base + "/v1/jobs", json={"text": "calm piano", "seconds": 12, "steps": [3, 2, 1, 1],
                                                "seed": 2}, timeout=30)
        assert r.status_code == 202, r.text
        st = wait(base, r.json()["id"])
        assert st["status"] == "done", st
        got = httpx.get(f"{base}/v1/jobs/{st['id']}/audio", timeout=30).content
    assert widths == [engine.segment_frames()] * 2 and st["windows"] == 2, widths
    res = cli("generate", "--model", full_model, "--text", "calm piano", "--seconds", 12, "--seed", 2, "--out",
              tmp_path / "o.wav", "--dtype", "float32", *FAST)
    assert res.exit_code == 0, res.output
    assert sf.read(tmp_path / "o.wav")[0].tolist() == sf.read(io.BytesIO(got))[0].tolist()


@pytest.mark.parametrize("dtype,tol", [("bfloat16", 4e-2), ("float16", 5e-3)])
def test_half_precision_30s_length_is_finite_and_close(model_dir, dtype, tol):
    """A 30 s model's length (1500 frames) in bf16 and fp16 (audiocraft #564: NaN in fp16): finite
    logits within ``tol`` of fp32 relative to their scale (bf16 keeps 8 bits of mantissa: about 1.5e-2
    at MAGNeT-small width; fp16 about 2e-3)."""
    cfg = ModelConfig.load(model_dir)
    enc = TextEncoder(model_dir / "text_encoder")
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, cfg.lm.codebook_size, (1, 1, 4, 1500), generator=g)
    codes[0, 0, 1:] = cfg.lm.mask_id
    codes[0, 0, 0, ::2] = cfg.lm.mask_id
    out = {}
    for dt in ("float32", dtype):
        lm = load_lm(model_dir / cfg.weights["lm"], cfg.lm, dtype=dt)
        text = lm.project_text(enc.encode(PROMPTS[0]))
        out[dt] = lm.forward_requests([(codes.expand(2, -1, -1, -1), TextRows(text, 1, None), 0, None)])[0]
    assert torch.isfinite(out[dtype]).all()
    assert rel_err(out[dtype], out["float32"]) < tol


def fake_hub_repo(hub: Path, repo: str, files: dict) -> None:
    """A repo as huggingface_hub caches it: models--org--name/{refs/main, snapshots/<commit>/...}."""
    root = hub / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0" * 40)
    for name, write in files.items():
        write(snap / name)


def test_convert_from_the_hf_cache_offline(tmp_path, monkeypatch):
    """audiocraft's download layout in the HF cache (LM repo with a weightless codec pointer, the HF
    encodec folder, google-t5/t5-base) -> `stemgen convert --from-hf-cache REPO`, then --model REPO."""
    import shutil

    from transformers import EncodecConfig, EncodecModel
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("STEMGEN_CACHE", str(tmp_path / "stemgen"))
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(hub))
    pointer = {"pretrained": "facebook/encodec_32khz", "xp.cfg": "", "version": "1.3.0", "exported": True}
    fake_hub_repo(hub, "facebook/magnet-small-10secs", {
        "state_dict.bin": lambda p: shutil.copy(FIX / "state_dict.bin", p),
        "compression_state_dict.bin": lambda p: torch.save(pointer, p)})
    conf = EncodecConfig(sampling_rate=32000, audio_channels=1, num_filters=4, upsampling_ratios=[8, 5, 4, 4],
                         codebook_size=256, hidden_size=16, codebook_dim=16, use_causal_conv=False, pad_mode="reflect",
                         normalize=False, use_conv_shortcut=False, num_lstm_layers=1, target_bandwidths=[1.6],
                         compress=2, chunk_length_s=None, overlap=None)
    torch.manual_seed(0)
    fake_hub_repo(hub, "facebook/encodec_32khz", {"model": lambda p: EncodecModel(conf).save_pretrained(p.parent)})
    fake_hub_repo(hub, "google-t5/t5-base", {"t5": lambda p: shutil.copytree(FIX / "t5-tiny", p.parent,
                                                                              dirs_exist_ok=True)})
    res = cli("generate", "--model", "facebook/magnet-small-10secs", "--text", "calm piano", "--out", tmp_path / "x.wav")
    assert res.exit_code != 0 and "stemgen convert --from-hf-cache facebook/magnet-small-10secs" in res.output
    res = cli("convert", "--from-hf-cache", "facebook/magnet-small-10secs")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "stemgen" / "hf" / "facebook--magnet-small-10secs" / "config.json").is_file()
    res = cli("generate", "--model", "facebook/magnet-small-10secs", "--text", "calm piano", "--seconds", 1,
              "--out", tmp_path / "x.wav", *FAST)
    assert res.exit_code == 0, res.output
    res = cli("convert", "--from-hf-cache", "facebook/magnet-medium-30secs")
    assert res.exit_code != 0 and "not in the Hugging Face cache" in res.output, res.output


def test_fidelity_script_sets_a_dtype_against_fp32(model_dir, tmp_path):
    """bench/magnet_fidelity.py: fp32 against itself is exact in both head forms (so the script compares
    like with like); bf16 moves the guided distribution a little, folded and on every row."""
    import importlib.util
    import json
    spec = importlib.util.spec_from_file_location("magnet_fidelity", Path(__file__).parents[1] / "bench" / "magnet_fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    common = ["--engine-model", str(model_dir), "--prompts", "2", "--frames", "24", "--steps", "3,2,1,1"]
    same = mod.main(common + ["--dtype", "float32"])["levels"]
    assert set(same) == {"0", "1", "2", "3", "all"}
    for form in ("folded", "every row"):
        assert same["all"][form]["guided_tv_max"] < 1e-4 and same["all"][form]["guided_top1"] == 1.0
    out = tmp_path / "bf16.json"
    bf16 = mod.main(common + ["--dtype", "bfloat16", "--json", str(out)])
    assert json.loads(out.read_text())["levels"] == bf16["levels"]
    for form in ("folded", "every row"):
        assert 0 < bf16["levels"]["all"][form]["guided_tv_mean"] < 0.3
        assert bf16["levels"]["all"][form]["frames"] == same["all"][form]["frames"] > 0
