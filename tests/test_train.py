"""`stemgen train` / `train-codec`: pairs as SPEC 5, exact resume, DDP, bad inputs, export -> convert."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stemgen.cli import app
from stemgen.engine.codec import Codec, CodecConfig
from stemgen.random_model import random_codec_weights
from stemgen.evaluation.corpus import make_corpus
from stemgen.train.data import PairSampler, TokenCorpus, tokenize_corpus
from stemgen.train.loop import TrainError
from stemgen.train.trainer import TrainConfig, train_lm

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
TINY_CODEC = CodecConfig(n_filters=4, dimension=16, bins=64, lstm_layers=1)
TINY_LM = dict(d_model=32, n_heads=2, n_layers=1, ffn_multiple_of=32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("c") / "toy", songs=3, seed=5, sr=32000)


@pytest.fixture(scope="module")
def cache(corpus, tmp_path_factory):
    codec = Codec(TINY_CODEC, random_codec_weights(TINY_CODEC, 0))
    return tokenize_corpus(corpus, codec, "tiny-codec", tmp_path_factory.mktemp("t") / "tokens", log=lambda m: None)


def tiny_cfg(**kw):
    return TrainConfig(preset="tiny", model=TINY_LM, frames=40, batch_size=3, val_songs=1, val_every=4,
                       val_batches=1, ckpt_every=2, warmup=2, **kw)


def test_pairs_follow_spec5(cache):
    corpus = TokenCorpus(cache)
    item = corpus.items[0]
    assert item["classes"] == ["Drums", "Bass", "Synth Pad", "Synth Lead"]
    assert len(item["subsets"]) == 15                      # every non-empty subset of 4 stems
    sampler = PairSampler(corpus, ["bass", "drums", "synth_lead", "synth_pad"], frames=40)
    rng = np.random.default_rng(0)
    tok, inst = sampler.sample(64, rng)
    assert tok.shape == (64, 2, 4, 40) and inst.min() >= 0 and inst.max() <= 3
    # the target channel is one stem's codes, the context a mix that never contains the target
    for k, e in enumerate(corpus.items):
        for t, ctxs in enumerate(e["contexts_of"]):
            assert ctxs and all(t not in c for c in ctxs)
            assert len(ctxs) == 7                          # subsets of the 3 other stems


def test_rest_contexts_tokenise_fewer_mixes(corpus, tmp_path):
    codec = Codec(TINY_CODEC, random_codec_weights(TINY_CODEC, 0))
    c = TokenCorpus(tokenize_corpus(corpus, codec, "k", tmp_path / "t", contexts="rest", log=lambda m: None))
    assert len(c.items[0]["subsets"]) == 8
    assert sorted(map(len, c.items[0]["contexts_of"])) == [4, 4, 4, 4]   # 3 single others + all others


def picked_contexts(sampler, tok):
    """The subset behind each pair's context channel, found by matching the codes back to the cache."""
    found = []
    for pair in tok:
        hits = {tuple(sub) for e in sampler.corpus.items for j, sub in enumerate(e["subsets"])
                for start in range(e["frames"] - tok.shape[-1] + 1)
                if torch.equal(e["codes"][j, :, start:start + tok.shape[-1]], pair[0])
                and any(torch.equal(e["codes"][e["subset_index"][(t,)], :, start:start + tok.shape[-1]], pair[1])
                        for t in range(len(e["classes"])))}
        assert len(hits) == 1, hits
        found.append(hits.pop())
    return found


def test_full_context_prob_gives_the_whole_band(cache):
    """--full-context-prob p: that share of the pairs has every other stem as the context, the rest
    SPEC 5's uniform draw; at 0 the pairs (and the generator) are exactly those without the option."""
    inst = ["bass", "drums", "synth_lead", "synth_pad"]
    corpus = TokenCorpus(cache)
    spec, off = PairSampler(corpus, inst, frames=40), PairSampler(corpus, inst, frames=40, full_prob=0.0)
    r1, r2 = np.random.default_rng(3), np.random.default_rng(3)
    assert torch.equal(spec.sample(16, r1)[0], off.sample(16, r2)[0])
    assert r1.bit_generator.state == r2.bit_generator.state
    full = PairSampler(corpus, inst, frames=40, full_prob=1.0)
    assert all(len(c) == 3 for c in picked_contexts(full, full.sample(24, np.random.default_rng(0))[0]))
    half = PairSampler(corpus, inst, frames=40, full_prob=0.5)
    share = np.mean([len(c) == 3 for c in picked_contexts(half, half.sample(120, np.random.default_rng(1))[0])])
    assert abs(share - (0.5 + 0.5 / 7)) < 0.12, share          # 7 subsets of the other 3 stems
    assert np.mean([len(c) == 3 for c in picked_contexts(spec, spec.sample(120, np.random.default_rng(1))[0])]) < 0.3
    res = CliRunner().invoke(app, ["train", "nowhere", "--codec", "nowhere", "--out", "nowhere",
                                   "--full-context-prob", "-0.1"])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "--full-context-prob" in res.output, res.output


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def test_resume_is_exact(cache, tmp_path):
    train_lm(cache, tmp_path / "straight", tiny_cfg(steps=6), log=lambda m: None, every=1)
    train_lm(cache, tmp_path / "split", tiny_cfg(steps=3), log=lambda m: None, every=1)
    # a run killed after step 3's checkpoint may have logged steps it will redo
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n" + '{"step": 4, "lo')   # and a line cut short
    # resuming extends the run: same loss curve and the same final weights as the straight run
    train_lm(cache, tmp_path / "split", tiny_cfg(steps=6), log=lambda m: None, every=1)
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split" / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a run with another seed differs (the comparison can fail)
    train_lm(cache, tmp_path / "other", tiny_cfg(steps=3, seed=1), log=lambda m: None, every=1)
    assert losses(tmp_path / "other")[:3] != losses(tmp_path / "straight")[:3]
    assert (tmp_path / "straight" / "loss.png").stat().st_size > 1000


def test_checkpoint_converts_and_runs(cache, tmp_path):
    from stemgen.weights_convert import convert_train_checkpoint

    final = train_lm(cache, tmp_path / "run", tiny_cfg(steps=2), log=lambda m: None)
    cfg, instruments, state = convert_train_checkpoint(final)
    assert instruments == ["bass", "drums", "synth_lead", "synth_pad"] and cfg.codebook_size == 64


def test_bad_checkpoint_and_cache_one_line(cache, corpus, tmp_path):
    run = tmp_path / "run"
    train_lm(cache, run, tiny_cfg(steps=2), log=lambda m: None)
    with pytest.raises(TrainError, match="other settings.*lr"):
        train_lm(cache, run, tiny_cfg(steps=4, lr=5e-4), log=lambda m: None)
    (run / "last.pt").write_bytes(b"\x80\x02garbage" * 10)
    with pytest.raises(TrainError, match="not a readable checkpoint"):
        train_lm(cache, run, tiny_cfg(steps=4), log=lambda m: None)
    with pytest.raises(TrainError, match="not a readable token cache"):
        TokenCorpus(tmp_path)
    res = CliRunner().invoke(app, ["train", str(tmp_path / "nope"), "--codec", str(tmp_path), "--out",
                                   str(tmp_path / "x")])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "error:" in res.output, res.output


def test_train_codec_export_converts(corpus, tmp_path):
    pytest.importorskip("auraloss")
    from stemgen.train.codec import CodecTrainConfig, train_codec
    from stemgen.weights_convert.codec import load_codec_any

    cfg = CodecTrainConfig(steps=2, batch_size=2, n_filters=4, dimension=16, bins=32, segment_s=0.25, warmup=1)
    path = train_codec(corpus, tmp_path / "c", cfg, log=lambda m: None, every=1, ckpt_every=1)
    codec, key = load_codec_any(path)
    x = torch.randn(1, 1, 3200) * 0.1
    codes = codec.encode(x)
    assert codes.shape == (1, 4, 5) and int(codes.max()) < 32
    assert codec.decode(codes).shape == (1, 1, 3200)
    # resuming a finished run does no more steps and exports the same weights
    again, key2 = load_codec_any(train_codec(corpus, tmp_path / "c", cfg, log=lambda m: None))
    assert key == key2


def test_torchrun_ddp_two_cpu_processes(cache, tmp_path):
    """The same trainer under torchrun (2 processes, gloo): both ranks train, each on its own data, and
    take their process group down at the end (a gloo group left to the exit once aborted a rank in CI)."""
    script = tmp_path / "ddp.py"
    script.write_text(
        "import sys, torch\n"
        "from stemgen.train.trainer import TrainConfig, train_lm\n"
        f"cfg = TrainConfig(preset='tiny', model={TINY_LM!r}, frames=40, batch_size=2, steps=2, val_songs=1,"
        " val_every=100, ckpt_every=100, warmup=1)\n"
        "train_lm(sys.argv[1], sys.argv[2], cfg, log=lambda m: None)\n"
        "sys.stdout.write(f'process group left: {torch.distributed.is_initialized()}\\n')\n")   # one write: ranks share the pipe
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                        "127.0.0.1", "--master-port", str(port), str(script), str(cache), str(tmp_path / "run")], env=env, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("process group left: False") == 2, r.stdout   # each rank took its group down
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ck["config"]["world"] == 2 and len(ck["ranks"]) == 2 and ck["step"] == 2
    assert ck["ranks"][0]["numpy"] != ck["ranks"][1]["numpy"]


def test_validation_measures_listening(cache, tmp_path):
    """Validation reports the level-0 loss of a fully masked target with the song's context and with
    the NULL context; the gain is their difference, and exactly 0 when the context is already NULL."""
    from stemgen.train import StemGenLM, preset
    from stemgen.train.trainer import listening

    run = tmp_path / "run"
    train_lm(cache, run, tiny_cfg(steps=4), log=lambda m: None, every=1)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    v = [r for r in rows if "val_listen_gain" in r][-1]
    assert v["val_listen_gain"] == pytest.approx(v["val_blank_null_q0"] - v["val_blank_q0"])
    assert v["val_blank_q0"] > 0 and v["val_blank_q0"] != v["val_blank_null_q0"]

    torch.manual_seed(0)
    model = StemGenLM(preset("tiny", **TINY_LM, instruments=["bass", "drums", "synth_lead", "synth_pad"])).eval()
    sampler = PairSampler(TokenCorpus(cache), model.cfg.instruments, frames=40)
    tok, inst = sampler.sample(3, np.random.default_rng(0))
    state = torch.get_rng_state()
    real = listening(model, [(tok, inst)], None)
    assert torch.equal(torch.get_rng_state(), state)        # the training RNG stream is untouched
    assert real["val_listen_gain"] != 0
    tok[:, 0] = model.cfg.null_id
    assert listening(model, [(tok, inst)], None)["val_listen_gain"] == 0.0


@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
def test_training_drops_each_conditioning_source(rate):
    """SPEC 5: the context audio and the instrument are dropped independently (multi-source CFG
    evaluates p(t | instrument) with a NULL context and p(t) with both NULL)."""
    from stemgen.train import StemGenLM, preset

    torch.manual_seed(0)
    cfg = preset("tiny", **TINY_LM, instruments=["bass", "drums", "synth_lead", "synth_pad"])
    cfg.cond_dropout = rate
    model = StemGenLM(cfg)
    seen = {}
    model.embed = lambda tokens, conditions: seen.update(tokens=tokens, cond=conditions) or \
        StemGenLM.embed(model, tokens, conditions)
    B = 400
    tok = torch.randint(0, cfg.codebook_size, (B, 2, cfg.n_q, 12))
    inst = torch.randint(0, 4, (B, 1))
    StemGenLM.training_loss(model, tok, inst, generator=torch.Generator().manual_seed(1))
    ctx_null = (seen["tokens"][:, 0] == cfg.null_id).flatten(1)
    assert (ctx_null.all(1) | ~ctx_null.any(1)).all()             # a whole context, or none of it
    assert torch.equal(seen["tokens"][~ctx_null.all(1), 0], tok[~ctx_null.all(1), 0])  # never masked
    deaf, no_inst = ctx_null.all(1).float(), (seen["cond"][:, 0] == cfg.cond_sizes[0]).float()
    assert abs(deaf.mean() - rate) < 0.07 and abs(no_inst.mean() - rate) < 0.07
    if 0 < rate < 1:   # independent: both dropped about rate^2 of the time
        assert abs((deaf * no_inst).mean() - rate ** 2) < 0.05


def test_blank_prob_trains_the_samplers_first_step(cache):
    """--blank-prob 1: every pair is level 0 with every target frame masked, so the loss is the
    cross-entropy of level 0 over all frames given only the context (checked against a direct
    computation); at 0 the loss is the SPEC-5 one (it differs)."""
    from stemgen.train import StemGenLM, preset

    torch.manual_seed(0)
    model = StemGenLM(preset("tiny", **TINY_LM, instruments=["bass", "drums", "synth_lead", "synth_pad"],
                             cond_dropout=0.0)).eval()
    tok, inst = PairSampler(TokenCorpus(cache), model.cfg.instruments, frames=40).sample(4, np.random.default_rng(0))
    with torch.no_grad():
        blank = model.training_loss(tok, inst[:, None], torch.Generator().manual_seed(1), blank_prob=1.0)
        inp = tok.clone()
        inp[:, -1] = model.cfg.mask_id
        logits = model(inp, inst[:, None])[:, 0]
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tok[:, -1, 0].reshape(-1))
        spec = model.training_loss(tok, inst[:, None], torch.Generator().manual_seed(1), blank_prob=0.0)
    assert float(blank) == pytest.approx(float(want), rel=1e-5)
    assert float(spec) != pytest.approx(float(want), rel=1e-3)
    # at 0 the masking generator advances exactly as the SPEC-5 draws always did (level, fraction,
    # frame mask, condition dropout, context dropout), so runs begun before the option resume bit-exactly
    g, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.training_loss(tok, inst[:, None], g)
    B, T = tok.shape[0], tok.shape[-1]
    torch.randint(0, 4, (B,), generator=ref), torch.rand(B, generator=ref), torch.rand(B, T, generator=ref)
    torch.rand((B, 1), generator=ref), torch.rand(B, generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())


def test_init_from_and_resume_of_older_checkpoints(cache, tmp_path):
    """--init-from starts from another run's weights (fresh optimizer) and need not be repeated to
    resume; a checkpoint written before a setting existed resumes as that setting's default; an
    --init-from of another model, or not an LM checkpoint, is one line."""
    first = train_lm(cache, tmp_path / "a", tiny_cfg(steps=2), log=lambda m: None)
    start = train_lm(cache, tmp_path / "b", tiny_cfg(steps=0, init_from=str(first)), log=lambda m: None)
    a = torch.load(first, weights_only=True)["model"]
    b = torch.load(start, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    fresh = train_lm(cache, tmp_path / "c", tiny_cfg(steps=0), log=lambda m: None)
    assert not all(torch.equal(a[k], v) for k, v in torch.load(fresh, weights_only=True)["model"].items())
    train_lm(cache, tmp_path / "b", tiny_cfg(steps=2, init_from=str(tmp_path / "a" / "last.pt")), log=lambda m: None)
    train_lm(cache, tmp_path / "b", tiny_cfg(steps=3), log=lambda m: None)     # resumes without --init-from

    ck = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    del ck["config"]["blank_prob"]                                      # as written by an older trainer
    ck["config"]["init_from"] = ""                                      # which also checked init_from
    torch.save(ck, tmp_path / "a" / "last.pt")
    train_lm(cache, tmp_path / "a", tiny_cfg(steps=3), log=lambda m: None)
    with pytest.raises(TrainError, match="other settings.*blank_prob"):
        train_lm(cache, tmp_path / "a", tiny_cfg(steps=4, blank_prob=0.5), log=lambda m: None)

    wider = TrainConfig(preset="tiny", model=dict(TINY_LM, n_heads=4), frames=40, batch_size=3, val_songs=1,
                        steps=1, init_from=str(first))                  # same tensor shapes, other heads
    with pytest.raises(TrainError, match="init-from.*differs.*n_heads"):
        train_lm(cache, tmp_path / "d", wider, log=lambda m: None)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(TrainError, match="not a readable LM checkpoint"):
        train_lm(cache, tmp_path / "e", tiny_cfg(steps=1, init_from=str(tmp_path / "junk.pt")), log=lambda m: None)
    res = CliRunner().invoke(app, ["train", str(tmp_path / "nope"), "--codec", str(tmp_path), "--out",
                                   str(tmp_path / "f"), "--blank-prob", "1.5"])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "--blank-prob" in res.output, res.output


def test_deepen_recipe_keeps_what_the_lm_computes(cache, tmp_path):
    """train/recipes/deepen_lm.py: the deeper LM gives the same logits as the one it came from (new
    layers add nothing until trained), trains on with --init-from, and refuses to remove layers."""
    from stemgen.train import load_checkpoint
    first = train_lm(cache, tmp_path / "a", tiny_cfg(steps=2), log=lambda m: None)
    script = os.path.join(os.path.dirname(__file__), "..", "train", "recipes", "deepen_lm.py")
    run = subprocess.run([sys.executable, script, str(first), str(tmp_path / "deep.pt"), "--n-layers", "3"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    a, b = load_checkpoint(first).eval(), load_checkpoint(tmp_path / "deep.pt").eval()
    assert (a.cfg.n_layers, b.cfg.n_layers) == (1, 3)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, a.cfg.codebook_size, (2, 2, a.cfg.n_q, 29), generator=g)
    cond = torch.tensor([[0], [1]])
    with torch.no_grad():
        la, lb = a(tokens, cond), b(tokens, cond)
    assert la.abs().max() > 0 and torch.equal(la, lb)
    deeper = TrainConfig(preset="tiny", model=dict(TINY_LM, n_layers=3), frames=40, batch_size=3, val_songs=1,
                         steps=1, init_from=str(tmp_path / "deep.pt"))
    assert load_checkpoint(train_lm(cache, tmp_path / "b", deeper, log=lambda m: None)).cfg.n_layers == 3
    run = subprocess.run([sys.executable, script, str(tmp_path / "deep.pt"), str(tmp_path / "x.pt"), "--n-layers", "2"],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "below the model's 3 layers" in run.stderr and not (tmp_path / "x.pt").exists()
    run = subprocess.run([sys.executable, script, str(first), str(tmp_path / "x.pt"), "--n-layers", "10000000"],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "--n-layers" in run.stderr and "GiB" in run.stderr, run.stderr
    assert run.stderr.count("\n") == 1 and not (tmp_path / "x.pt").exists()


def test_codec_harmony_term_hears_pitch_not_level():
    """The codec's chroma term: ~0 for the same chord at another level, large for another chord,
    and silence in the input does not count."""
    from stemgen.train.codec import chroma_filter, chroma_loss

    sr = 32000
    t = torch.arange(sr) / sr
    chord = lambda midi: sum(torch.sin(2 * torch.pi * 440 * 2 ** ((m - 69) / 12) * t) for m in midi)[None, None]
    fb = chroma_filter(sr, 4096)
    assert int(fb[round(440 * 4096 / sr)].argmax()) == 9 and fb[: round(150 * 4096 / sr)].sum() == 0  # A; no bass
    c_major, d_major = chord([60, 64, 67]), chord([62, 66, 69])
    assert float(chroma_loss(0.3 * c_major, c_major, fb)) < 1e-4
    assert float(chroma_loss(d_major, c_major, fb)) > 1.0
    quiet = c_major.clone()
    quiet[..., sr // 2:] = 0
    louder = 0.5 * c_major.clone()
    louder[..., sr // 2:] = d_major[..., sr // 2:]   # where the input is silent the output is not judged
    assert float(chroma_loss(louder, quiet, fb)) < 0.2


def _set_in(obj, path, value):
    node = obj
    for k in path[:-1]:
        node = node[k]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value(node[path[-1]]) if callable(value) and not isinstance(value, type) else value


CRAFTED_LAST_PT = [
    (("model",), KeyError, "'model' is missing"),
    (("model",), {}, "model does not have"),
    (("model", "norm.weight"), torch.zeros(3), "model.norm.weight is not a torch.float32 tensor"),
    (("model", "norm.weight"), lambda t: t * float("nan"), "NaN"),
    (("optimizer",), [1, 2], "not an optimizer state"),
    (("optimizer", "param_groups", 0, "params"), [0], "parameters"),
    (("optimizer", "param_groups", 0, "lr"), "fast", "param_groups[0].lr"),
    (("optimizer", "param_groups", 0, "amsgrad"), True, "param_groups[0].amsgrad"),
    (("optimizer", "state", 0, "exp_avg"), torch.zeros(2), "optimizer.state[0].exp_avg"),
    (("optimizer", "state", 10 ** 6), {}, "keyed by this model's parameters"),
    (("scheduler", "optimizer"), 5, "schedule state"),
    (("scheduler", "lr_lambdas"), [{"__code__": 1}], "lr_lambdas"),
    (("scheduler", "last_epoch"), 7, "last_epoch 7"),
    (("step",), "2", "step '2'"),
    (("step",), -1, "step '-1'"),
    (("ranks",), [], "ranks"),
    (("ranks", 0, "numpy"), {"bit_generator": "MT19937"}, "ranks[0].numpy"),
    (("ranks", 0, "gen"), torch.zeros(3, dtype=torch.uint8), "ranks[0].gen"),
    (("ranks", 0, "torch"), lambda t: t.float(), "ranks[0].torch"),
    (("config",), [1], "'config' is not a mapping"),
]


@pytest.fixture(scope="module")
def finished_run(cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("fr") / "run"
    train_lm(cache, run, tiny_cfg(steps=2), log=lambda m: None)
    return run


@pytest.mark.parametrize("path, value, needle", CRAFTED_LAST_PT)
def test_crafted_last_pt_is_one_line_and_changes_nothing(cache, finished_run, tmp_path, path, value, needle):
    """A damaged or crafted OUT/last.pt (wrong types, missing or extra entries, another model's
    tensors, states a generator cannot take): one TrainError line before anything is restored or
    written; no code runs (weights_only)."""
    import re
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "model.pt").unlink()
    ck = torch.load(run / "last.pt", weights_only=True)
    _set_in(ck, path, value)
    torch.save(ck, run / "last.pt")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(TrainError, match=re.escape(needle)) as e:
        train_lm(cache, run, tiny_cfg(steps=4), log=lambda m: None)
    assert "\n" not in str(e.value)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_crafted_codec_last_pt(corpus, tmp_path):
    pytest.importorskip("auraloss")
    from stemgen.train.codec import CodecTrainConfig, train_codec

    cfg = CodecTrainConfig(steps=1, batch_size=1, n_filters=4, dimension=16, bins=32, segment_s=0.25, warmup=1,
                           fft_sizes=[512, 256])
    train_codec(corpus, tmp_path / "c", cfg, log=lambda m: None, ckpt_every=1)
    good = torch.load(tmp_path / "c" / "last.pt", weights_only=True)
    more = CodecTrainConfig(**{**cfg.__dict__, "steps": 2})
    for path, value, needle in ((("rng", "python"), "x", "rng.python"), (("rng", "numpy"), 3, "rng.numpy"),
                                (("scheduler", "base_lrs"), [1.0, 2.0], "scheduler.base_lrs"),
                                (("model",), KeyError, "'model' is missing")):
        ck = torch.load(tmp_path / "c" / "last.pt", weights_only=True)
        _set_in(ck, path, value)
        torch.save(ck, tmp_path / "c" / "last.pt")
        with pytest.raises(TrainError, match=needle):
            train_codec(corpus, tmp_path / "c", more, log=lambda m: None)
    torch.save(good, tmp_path / "c" / "last.pt")
    train_codec(corpus, tmp_path / "c", more, log=lambda m: None)    # the intact checkpoint still resumes


DISK_FULL_SCRIPT = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
from stemgen.engine.errors import StemGenError
from stemgen.train.codec import CodecTrainConfig, train_codec
from stemgen.train.trainer import TrainConfig, train_lm
res = {}
try:
    train_lm(sys.argv[2], sys.argv[3], TrainConfig(**json.loads(sys.argv[4])), log=lambda m: None)
    res["lm"] = "finished"
except StemGenError as e:
    res["lm"] = str(e)
try:
    train_codec(sys.argv[5], sys.argv[6], CodecTrainConfig(**json.loads(sys.argv[7])), log=lambda m: None)
    res["codec"] = "finished"
except StemGenError as e:
    res["codec"] = str(e)
print(json.dumps(res))
"""


def test_full_disk_keeps_the_previous_checkpoint(cache, corpus, tmp_path):
    """A write that fails for a file-size limit (as on a full disk): train and train-codec end in
    one error line, the checkpoint and export they would have replaced are kept, no temporary left."""
    pytest.importorskip("auraloss")
    from dataclasses import asdict

    from stemgen.train.codec import CodecTrainConfig, train_codec

    run, crun = tmp_path / "run", tmp_path / "codec"
    train_lm(cache, run, tiny_cfg(steps=2), log=lambda m: None)
    ccfg = CodecTrainConfig(steps=1, batch_size=1, n_filters=4, dimension=16, bins=32, segment_s=0.25, warmup=1,
                            fft_sizes=[512, 256])
    train_codec(corpus, crun, ccfg, log=lambda m: None, ckpt_every=1)
    kept = {p: p.read_bytes() for p in (run / "last.pt", run / "model.pt", crun / "last.pt",
                                        crun / "compression_state_dict.bin")}
    limit = 2 * (run / "loss.png").stat().st_size    # the curve fits, the checkpoints do not
    assert limit < min(len(kept[run / "last.pt"]), len(kept[crun / "last.pt"]))
    script = tmp_path / "full.py"
    script.write_text(DISK_FULL_SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(limit), str(cache), str(run),
                        json.dumps(asdict(tiny_cfg(steps=4))), str(corpus), str(crun),
                        json.dumps({**asdict(ccfg), "steps": 2})], capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for k, folder in (("lm", run), ("codec", crun)):   # torch's writer does not say why; the message guesses
        assert res[k].startswith(f"cannot write {folder / 'last.pt'}: ") and "\n" not in res[k], res
        assert "full disk or a file-size limit" in res[k], res
    assert all(p.read_bytes() == b for p, b in kept.items())
    assert not list(run.glob(".*tmp*")) and not list(crun.glob(".*tmp*"))
