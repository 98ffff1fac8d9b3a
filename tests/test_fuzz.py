"""Property-based fuzzing of everything that reads untrusted input: the model-directory loader,
the LM and codec converters and the audio reader. Only the project's own error type may escape,
and nothing may allocate without bound (the process' peak RSS is checked at the end)."""
import io
import json
import os
import resource
import shutil
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from stemgen.engine.config import ModelConfig
from stemgen.engine.errors import StemGenError

from helpers import tiny_model_dir

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_value = st.recursive(json_leaf, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                          max_leaves=12)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("fz"))


@pytest.fixture(scope="module")
def valid_config(model):
    return json.loads((model / "config.json").read_text())


def paths(doc, prefix=()):
    """Every (path) to a value inside a JSON document."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from paths(v, prefix + (i,))


def replaced(doc, path, value):
    if not path:
        return value
    doc = json.loads(json.dumps(doc))
    node = doc
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return doc


@FUZZ
@given(data=st.data())
def test_config_loader_mutations(model, valid_config, tmp_path_factory, data):
    """One field of a valid config.json replaced by arbitrary JSON: a valid engine or one StemGenError."""
    from stemgen.engine import Engine

    all_paths = list(paths(valid_config))
    path = data.draw(st.sampled_from(all_paths))
    doc = replaced(valid_config, path, data.draw(json_value))
    d = tmp_path_factory.mktemp("cfg")
    for f in model.iterdir():
        if f.name != "config.json":
            os.link(f, d / f.name)     # a hard link: a symlink out of the model directory is refused
    (d / "config.json").write_text(json.dumps(doc))
    try:
        ModelConfig.load(d)
        Engine.from_pretrained(d, device="cpu", dtype="float32")
    except StemGenError:
        pass
    finally:
        shutil.rmtree(d)


@FUZZ
@given(raw=st.binary(max_size=300))
def test_config_loader_raw_bytes(tmp_path_factory, raw):
    d = tmp_path_factory.mktemp("raw")
    (d / "config.json").write_bytes(raw)
    with pytest.raises(StemGenError):
        ModelConfig.load(d)
    shutil.rmtree(d)


checkpoint_value = st.one_of(json_value, st.builds(lambda n: torch.zeros(n), st.integers(0, 4)))
state_dicts = st.dictionaries(st.one_of(st.text(max_size=40), st.integers(), st.sampled_from([
    "encoder.model.0.conv.conv.weight_g", "encoder.model.0.conv.conv.weight_v", "quantizer.vq.layers.0._codebook.embed",
    "quantizer.vq.layers.99999999._codebook.embed", "layers.0.attn.wq.weight"])), checkpoint_value, max_size=5)


@FUZZ
@given(obj=st.one_of(
    st.fixed_dictionaries({"best_state": st.one_of(state_dicts, json_value), "xp.cfg": st.one_of(st.text(max_size=80),
                                                                                                json_value)}),
    st.fixed_dictionaries({"config": st.one_of(json_value, st.dictionaries(st.sampled_from(
        ["d_model", "n_heads", "n_layers", "n_q", "codebook_size", "instruments", "extra_cond_sizes"]), json_value)),
        "model": st.one_of(state_dicts, json_value)}),
    state_dicts, json_value))
def test_converters_on_arbitrary_checkpoints(tmp_path_factory, obj):
    from stemgen.weights_convert import convert_train_checkpoint
    from stemgen.weights_convert.codec import convert_codec

    d = tmp_path_factory.mktemp("ck")
    src = d / "x.bin"
    torch.save(obj, src)
    for convert in (convert_codec, convert_train_checkpoint):
        with pytest.raises(StemGenError):
            convert(src)
    shutil.rmtree(d)


def wav_header(sr: int, channels: int, n_bytes: int, bits: int = 16) -> bytes:
    block = channels * bits // 8
    return (b"RIFF" + struct.pack("<I", 36 + n_bytes) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, channels, sr,
            (sr * block) % 2 ** 32, block, bits) + b"data" + struct.pack("<I", n_bytes))


@FUZZ
@given(sr=st.integers(0, 2 ** 32 - 1), channels=st.integers(0, 70), n=st.integers(0, 2 ** 31),
       body=st.binary(max_size=64), junk=st.binary(max_size=64), which=st.integers(0, 2))
def test_audio_reader(tmp_path_factory, sr, channels, n, body, junk, which):
    """Forged headers (any rate, channel count, declared length) and junk: audio or one AudioError,
    never a huge allocation."""
    from stemgen.engine.audio import read_audio

    d = tmp_path_factory.mktemp("au")
    p = d / "x.wav"
    p.write_bytes([wav_header(sr, channels, n) + body, junk, b"RIFF" + junk][which])
    try:
        audio, rate = read_audio(p)
        assert audio.ndim == 2 and np.isfinite(audio).all() and 4000 <= rate <= 384000
    except StemGenError:
        pass
    shutil.rmtree(d)


# --- the trainer: corpus metadata, options, a resumable checkpoint -----------------------------------

@pytest.fixture(scope="module")
def track(tmp_path_factory):
    """A minimal Slakh-layout track: two short stems, metadata.yaml rewritten by each example."""
    import soundfile as sf

    t = tmp_path_factory.mktemp("trk") / "Track00001"
    (t / "stems").mkdir(parents=True)
    for sid in ("S00", "S01"):
        sf.write(t / "stems" / f"{sid}.wav", np.full(800, 0.1, np.float32), 8000)
    return t


VALID_META = {"audio_dir": "stems", "stems": {"S00": {"inst_class": "Drums", "audio_rendered": True},
                                              "S01": {"inst_class": "Bass", "audio_rendered": True}}}
YAML_BITS = st.sampled_from(["!!binary aGVsbG8=", "!!python/name:os.system", "!!python/object/apply:os.system [ls]",
                             "!!timestamp 2001-12-14", "!!set {a, b}", "&a [*a]", "*x", "{", "[" * 50, "\x00",
                             "1" + "0" * 5000, "!!float nan", "!!int 0x7fffffffffffffffffff", "~", "'\x1b[2J'"])


@FUZZ
@given(data=st.data())
def test_corpus_metadata(track, data):
    """metadata.yaml mutated (a field replaced by any JSON value, or YAML text with tags, aliases,
    junk): the track's stems or one TrainError, never another exception."""
    import yaml

    from stemgen.train.data import read_track
    from stemgen.train.loop import TrainError

    if data.draw(st.booleans()):
        path = data.draw(st.sampled_from(list(paths(VALID_META))))
        text = yaml.safe_dump(replaced(VALID_META, path, data.draw(json_value)))
    else:
        lines = yaml.safe_dump(VALID_META).splitlines()
        k = data.draw(st.integers(0, len(lines) - 1))
        key = lines[k].split(":")[0]
        lines[k] = f"{key}: {data.draw(YAML_BITS)}" if data.draw(st.booleans()) else data.draw(st.text(max_size=30))
        text = "\n".join(lines) + "\n"
    (track / "metadata.yaml").write_text(text, errors="surrogatepass")
    try:
        classes, stems = read_track(track, 8000)
        assert len(classes) == stems.shape[0] and all(c.isprintable() for c in classes)
        event("read")
    except TrainError as e:
        assert "\n" not in str(e)
        event("refused")


option_value = st.one_of(st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=True, allow_infinity=True),
                         st.booleans(), st.none(), st.text(max_size=6), st.lists(st.integers(-5, 10 ** 6), max_size=3))


@FUZZ
@given(data=st.data())
def test_trainer_options(data):
    """Any option values for `stemgen train` / `train-codec`: accepted (and then within the schema's
    limits and the machine's memory, checked on the meta device) or one TrainError; never another
    exception, never an allocation (this test's peak RSS is the module's check below)."""
    from dataclasses import fields

    from stemgen.train.codec import CodecTrainConfig
    from stemgen.train.loop import TrainError
    from stemgen.train.trainer import TrainConfig, check_train_config

    names = [f.name for f in fields(TrainConfig) if f.name not in ("model", "init_from")]
    kw = {n: data.draw(option_value) for n in data.draw(st.lists(st.sampled_from(names), max_size=3, unique=True))}
    model = data.draw(st.dictionaries(st.sampled_from(["d_model", "n_heads", "n_layers", "n_q", "codebook_size",
                                                       "ffn_hidden", "rope_theta", "vocab"]),
                                      st.one_of(option_value, st.integers(1, 4096)), max_size=3))
    try:
        mcfg = check_train_config(TrainConfig(**{"preset": "tiny", **kw, "model": model}))
        assert mcfg.n_layers <= 256 and mcfg.d_model <= 16384
        event("train options accepted")
    except TrainError as e:
        assert "\n" not in str(e)
        event("train options refused")
    cnames = [f.name for f in fields(CodecTrainConfig) if f.name not in ("init_from", "ratios")]
    ckw = {n: data.draw(option_value) for n in data.draw(st.lists(st.sampled_from(cnames), max_size=3, unique=True))}
    try:
        CodecTrainConfig(**ckw).check()
    except TrainError as e:
        assert "\n" not in str(e)


@pytest.fixture(scope="module")
def resumable(tmp_path_factory):
    """A tiny LM's resumable state after one step, as train_lm checkpoints it (through torch.save)."""
    from stemgen.train import StemGenLM, preset

    def parts():
        torch.manual_seed(0)
        model = StemGenLM(preset("tiny", d_model=32, n_heads=2, n_layers=1, ffn_multiple_of=32,
                                 instruments=["bass", "drums"]))
        opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.01},
                                 {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                                lr=1e-3, betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        gen = torch.Generator().manual_seed(0)
        return model, opt, sched, gen

    model, opt, sched, gen = parts()
    tok = torch.randint(0, 64, (2, 2, 4, 8))
    StemGenLM.training_loss(model, tok, torch.zeros(2, 1, dtype=torch.long), generator=gen).backward()
    opt.step()
    sched.step()
    state = {"kind": "lm", "config": {}, "model": model.state_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "step": 1,
             "ranks": [{"numpy": np.random.default_rng(0).bit_generator.state, "gen": gen.get_state(),
                        "torch": torch.get_rng_state()}]}
    path = tmp_path_factory.mktemp("ck") / "last.pt"
    torch.save(state, path)
    return torch.load(path, weights_only=True), parts, tok


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_resumable_checkpoint(resumable, tmp_path_factory, data):
    """One entry of a valid last.pt replaced by any value (JSON-like, tensors of any shape and dtype):
    refused in one TrainError line, or accepted and then restored and trained on without error."""
    import copy

    from stemgen.train import StemGenLM
    from stemgen.train.loop import TrainError, check_resumable, rank_states

    good, parts, tok = resumable
    tensors = st.builds(lambda n, dt, v: torch.full((n,), v).to(dt), st.integers(0, 3),
                        st.sampled_from([torch.float32, torch.float16, torch.int64, torch.uint8, torch.bool]),
                        st.sampled_from([0.0, 1.0, float("nan")]))
    doc = copy.deepcopy(good)
    path = data.draw(st.sampled_from([p for p in paths(doc) if p]))
    doc = _replace_in(doc, path, data.draw(st.one_of(json_value, tensors)))
    f = tmp_path_factory.mktemp("ck") / "last.pt"
    torch.save(doc, f)
    state = torch.load(f, weights_only=True)
    model, opt, sched, gen = parts()
    try:
        check_resumable(state, f, model, opt, sched, 10, rank_states(1, gen))
    except TrainError as e:
        assert "\n" not in str(e)
        event("refused")
        return
    event("accepted")
    saved = torch.get_rng_state()
    try:       # accepted: it restores, and a step trains on it, without an exception
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        rng = np.random.default_rng(0)
        rng.bit_generator.state = state["ranks"][0]["numpy"]
        gen.set_state(state["ranks"][0]["gen"])
        torch.set_rng_state(state["ranks"][0]["torch"])
        loss = StemGenLM.training_loss(model, tok, torch.zeros(2, 1, dtype=torch.long), generator=gen)
        loss.backward()
        opt.step()
        sched.step()
    finally:
        torch.set_rng_state(saved)


def _replace_in(doc, path, value):
    """``replaced`` for documents holding tensors and tuples (a checkpoint): a copy with one entry set."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(doc, dict):
        return {**doc, head: _replace_in(doc[head], rest, value)}
    items = list(doc)
    items[head] = _replace_in(items[head], rest, value)
    return type(doc)(items) if isinstance(doc, tuple) else items


def test_memory_stayed_bounded():
    """Runs after the fuzzers in this module (file order): the peak RSS of the whole test process."""
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert peak_mb < 6000, f"peak RSS {peak_mb:.0f} MB"
