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
from hypothesis import HealthCheck, given, settings
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


def test_memory_stayed_bounded():
    """Runs after the fuzzers in this module (file order): the peak RSS of the whole test process."""
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert peak_mb < 6000, f"peak RSS {peak_mb:.0f} MB"
