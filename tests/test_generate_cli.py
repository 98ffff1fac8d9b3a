"""`stemgen generate` end to end on the random-weights model, and its bad-input errors."""
import hashlib
import json

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from stemgen.cli import app
from stemgen.random_model import RANDOM_VERSION
from stemgen.train import StemGenConfig, save_checkpoint

from helpers import random_train_model

runner = CliRunner()
FAST = ["--steps", "3,2,1,1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _cache_env(cache, monkeypatch):
    monkeypatch.setenv("STEMGEN_CACHE", str(cache))


def stereo_wav(path, seconds=5.0, sr=44100, scale=0.3):
    t = np.arange(int(sr * seconds)) / sr
    x = np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 277 * t)], axis=1) * scale
    sf.write(path, x, sr)
    return path


def gen(*args):
    """`stemgen generate` on the random-weights model (later options win: --model MODEL overrides)."""
    return runner.invoke(app, ["generate", "--model", "random", *map(str, args)])


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_generate_stereo_44k_context(tmp_path, cache):
    ctx = stereo_wav(tmp_path / "ctx.wav")
    out, mix = tmp_path / "stem.wav", tmp_path / "mix.wav"
    res = gen(ctx, "--instrument", "drums", "--out", out, "--mix", mix, "--seed", 3, *FAST)
    assert res.exit_code == 0, res.output
    assert "untrained" in res.stderr and "real-time factor" in res.stdout
    assert (cache / f"random-v{RANDOM_VERSION}" / "config.json").is_file()
    for p in (out, mix):
        info = sf.info(p)
        assert info.samplerate == 32000 and info.channels == 1
        assert info.frames == 5 * 32000  # exactly the context's duration
    stem, _ = sf.read(out)
    assert np.abs(stem).max() > 0 and np.abs(stem).max() <= 1.0
    again = tmp_path / "again.wav"
    assert gen(ctx, "-i", "drums", "--out", again, "--seed", 3, *FAST).exit_code == 0
    assert digest(again) == digest(out), "same seed, same file"
    other = tmp_path / "other.wav"
    assert gen(ctx, "-i", "drums", "--out", other, "--seed", 4, *FAST).exit_code == 0
    assert digest(other) != digest(out)


def test_variations_and_bits(tmp_path):
    ctx = stereo_wav(tmp_path / "ctx.wav", seconds=1.0)
    out = tmp_path / "v.wav"
    res = gen(ctx, "-i", "bass", "--out", out, "--variations", 2, "--bits", "24", "--steps", "soundstorm")
    assert res.exit_code == 0, res.output
    a, b = tmp_path / "v_1.wav", tmp_path / "v_2.wav"
    assert sf.info(a).subtype == "PCM_24" and digest(a) != digest(b)
    assert not out.exists()
    # variations run as one batch; each equals its own single run (seed 0 + 1 for the second)
    single = tmp_path / "single.wav"
    assert gen(ctx, "-i", "bass", "--out", single, "--seed", 1, "--bits", "24", "--steps", "16,1,1,1").exit_code == 0
    assert digest(single) == digest(b)


def test_silent_context_warns(tmp_path):
    ctx = tmp_path / "silence.wav"
    sf.write(ctx, np.zeros(16000), 16000)
    res = gen(ctx, "-i", "bass", "--out", tmp_path / "s.wav", *FAST)
    assert res.exit_code == 0, res.output
    assert "silent" in res.stderr
    assert sf.info(tmp_path / "s.wav").frames == 32000


def bad(tmp_path, ctx, *extra, needle):
    out = tmp_path / "o" / "stem.wav"
    out.parent.mkdir(exist_ok=True)
    res = gen(ctx, "--out", out, *FAST, *(extra or ("-i", "drums")))  # later options win
    assert res.exit_code != 0, res.output
    err = res.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert needle in err, err
    assert "Traceback" not in res.output
    assert list(out.parent.iterdir()) == [], "no output (or temp file) left behind"


def test_bad_inputs(tmp_path):
    bad(tmp_path, tmp_path / "missing.wav", needle="no such file")
    txt = tmp_path / "notes.wav"
    txt.write_text("this is not audio")
    bad(tmp_path, txt, needle="not a readable audio file")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0, 2)), 44100)
    bad(tmp_path, empty, needle="empty")
    short = tmp_path / "short.wav"
    sf.write(short, np.full(100, 0.1), 44100)
    bad(tmp_path, short, needle="shorter than one codec frame")
    nan = tmp_path / "nan.wav"
    x = np.full(44100, 0.1, dtype=np.float32)
    x[100] = np.nan
    sf.write(nan, x, 44100, subtype="FLOAT")
    bad(tmp_path, nan, needle="NaN")
    ok = stereo_wav(tmp_path / "ok.wav", seconds=0.5)
    bad(tmp_path, ok, "-i", "kazoo", needle="valid names: piano")
    bad(tmp_path, ok, "-i", "drums", "--steps", "4,4", needle="levels")
    bad(tmp_path, ok, "-i", "drums", "--steps", "a,b", needle="--steps")
    bad(tmp_path, ok, "-i", "drums", "--seed", str((1 << 63) - 1), "--variations", "2", *FAST,
        needle="past the largest (2^63 - 1): give a smaller --seed")
    bad(tmp_path, ok, "-i", "drums", "--guidance", "magnet", *FAST, needle="a StemGen model takes multi")


def test_seed_range_counts_the_seeds_a_run_takes(tmp_path):
    """Variation i of window k takes seed + i + k: windows count for a windowed run, not for --keep (one
    request per variation); past 2^63 - 1 is one line before any generation."""
    ok = stereo_wav(tmp_path / "ok.wav", seconds=0.5)
    top = str((1 << 63) - 1)
    res = gen(ok, "-i", "drums", "--keep", ok, "--regenerate", "0.1:0.3", "--window", "0.2", "--seed", top,
              "--out", tmp_path / "k.wav", *FAST)
    assert res.exit_code == 0 and (tmp_path / "k.wav").is_file(), res.output
    bad(tmp_path, ok, "-i", "drums", "--seed", top, "--window", "0.2", *FAST,
        needle="1 variation(s) and 3 window(s) takes seeds up to 9223372036854775809")


def test_output_folder_missing(tmp_path):
    ok = stereo_wav(tmp_path / "ok.wav", seconds=0.5)
    res = gen(ok, "-i", "drums", "--out", tmp_path / "nope" / "x.wav", *FAST)
    assert res.exit_code != 0 and "does not exist" in res.stderr
    res = gen(ok, "-i", "drums", "--out", tmp_path / "x.wav", "--mix", tmp_path / "nope" / "m.wav", *FAST)
    assert res.exit_code != 0 and "does not exist" in res.stderr
    assert not (tmp_path / "x.wav").exists()


def test_model_without_codec(tmp_path):
    ckpt = tmp_path / "lm.pt"
    save_checkpoint(random_train_model(StemGenConfig(d_model=32, n_heads=2, n_layers=1, codebook_size=24,
                                                     ffn_multiple_of=16)), ckpt)
    model = tmp_path / "lm_only"
    assert runner.invoke(app, ["convert", "--lm", str(ckpt), "--out", str(model)]).exit_code == 0
    ok = stereo_wav(tmp_path / "ok.wav", seconds=0.5)
    bad(tmp_path, ok, "-i", "drums", "--model", model, needle="has no codec")
    bad(tmp_path, ok, "-i", "drums", "--model", tmp_path / "nowhere", needle="not a directory")


def test_convert_with_codec_makes_a_complete_model(tmp_path, cache):
    """convert --lm --codec -> a model dir that `generate` runs (codec from the random model's weights,
    saved as an encodec-package-style .th is covered in test_codec; here the HF folder path)."""
    import torch
    from transformers import EncodecConfig, EncodecModel

    conf = EncodecConfig(sampling_rate=32000, audio_channels=1, num_filters=8, upsampling_ratios=[8, 5, 4, 4],
                         codebook_size=64, hidden_size=16, codebook_dim=16, use_causal_conv=False,
                         pad_mode="reflect", normalize=False, use_conv_shortcut=False, target_bandwidths=[2.2],
                         chunk_length_s=None, overlap=None)
    torch.manual_seed(0)
    hf = EncodecModel(conf)
    for layer in hf.quantizer.layers:
        layer.codebook.embed.normal_()
    hf.save_pretrained(tmp_path / "hf")
    ckpt = tmp_path / "lm.pt"
    save_checkpoint(random_train_model(StemGenConfig(d_model=32, n_heads=2, n_layers=1, codebook_size=64,
                                                     ffn_multiple_of=16)), ckpt)
    model = tmp_path / "full"
    res = runner.invoke(app, ["convert", "--lm", str(ckpt), "--codec", str(tmp_path / "hf"), "--out", str(model)])
    assert res.exit_code == 0, res.output
    info = json.loads(runner.invoke(app, ["info", str(model), "--json"]).stdout)
    assert info["config"]["codec"]["pad_mode"] == "reflect" and info["config"]["codec"]["bins"] == 64
    ok = stereo_wav(tmp_path / "ok.wav", seconds=1.0)
    res = gen(ok, "-i", "guitar", "--model", model, "--out", tmp_path / "g.wav", *FAST)
    assert res.exit_code == 0, res.output
    assert "untrained" not in res.stderr
    assert sf.info(tmp_path / "g.wav").frames == 32000
    # an LM whose vocabulary does not match the codec is refused, and nothing is written
    ckpt2 = tmp_path / "lm2.pt"
    save_checkpoint(random_train_model(StemGenConfig(d_model=32, n_heads=2, n_layers=1, codebook_size=24,
                                                     ffn_multiple_of=16)), ckpt2)
    res = runner.invoke(app, ["convert", "--lm", str(ckpt2), "--codec", str(tmp_path / "hf"),
                              "--out", str(tmp_path / "mismatch")])
    assert res.exit_code != 0 and "does not fit" in res.stderr and not (tmp_path / "mismatch").exists()


def test_python_api_generate_audio_and_tokens(cache):
    import torch

    from stemgen.engine import Engine
    from stemgen.random_model import ensure_random_model

    eng = Engine.from_pretrained(ensure_random_model(log=lambda m: None), device="cpu")
    sr = 44100
    audio = np.random.default_rng(0).standard_normal((2, sr // 2)).astype(np.float32) * 0.1
    res = eng.generate(audio, "bass", sample_rate=sr, seed=1, steps=(2, 1, 1, 1))
    assert res.stem.shape == (1, 16000) and res.tokens.shape == (4, 25)
    codes = eng.generate(res.tokens[None], "drums", seed=1, steps=(2, 1, 1, 1))
    assert isinstance(codes, torch.Tensor) and codes.shape == (4, 25)
    with pytest.raises(ValueError, match="sample_rate"):
        eng.generate(audio, "bass")


@pytest.mark.parametrize("ext,fmt,subtype", [("flac", "FLAC", "PCM_16"), ("ogg", "OGG", "VORBIS"),
                                             ("mp3", "MP3", "MPEG_LAYER_III")])
def test_other_input_formats(tmp_path, ext, fmt, subtype):
    sr = 44100
    x = (0.3 * np.sin(2 * np.pi * 220 * np.arange(sr) / sr)).astype(np.float32)
    src = tmp_path / f"ctx.{ext}"
    sf.write(src, x, sr, format=fmt, subtype=subtype)
    decoded = sf.info(src).frames
    res = gen(src, "-i", "bass", "--out", tmp_path / "o.wav", *FAST)
    assert res.exit_code == 0, res.output
    assert sf.info(tmp_path / "o.wav").frames == round(decoded * 32000 / sr)


def test_submit_audio_from_threads_matches_generate(cache):
    import threading

    from stemgen.engine import Engine
    from stemgen.random_model import ensure_random_model

    eng = Engine.from_pretrained(ensure_random_model(log=lambda m: None), device="cpu")
    sr = 22050
    rng = np.random.default_rng(1)
    clips = [rng.standard_normal((1, sr // 2 + 97 * i)).astype(np.float32) * 0.1 for i in range(4)]
    want = [eng.generate(c, "drums", sample_rate=sr, seed=i, steps=(2, 1, 1, 1)).stem for i, c in enumerate(clips)]
    handles = [None] * 4

    def submit(i):
        handles[i] = eng.submit_audio(clips[i], "drums", sample_rate=sr, seed=i, steps=(2, 1, 1, 1))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for h, w in zip(handles, want):
        assert np.array_equal(h.result(timeout=120).stem, w)
    bad = eng.submit_audio(np.full((1, 10), np.nan, dtype=np.float32), "drums", sample_rate=sr)
    with pytest.raises(ValueError, match="NaN"):
        bad.result(timeout=5)
    eng.close()


def test_outputs_get_ordinary_permissions(tmp_path):
    import os
    import stat

    ctx = stereo_wav(tmp_path / "ctx.wav", seconds=0.5)
    out = tmp_path / "p.wav"
    assert gen(ctx, "-i", "bass", "--out", out, *FAST).exit_code == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


def test_every_sampling_knob_has_one_cli_name():
    """One name per knob from the CLI to the kernel: each SamplingConfig field is a --flag of the
    same name (and the kernel's keyword, see kernels.sampling)."""
    import dataclasses
    import inspect

    from stemgen.engine.config import SamplingConfig
    from stemgen.kernels.sampling import guide_sample_rank_ref

    res = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    kernel_kw = set(inspect.signature(guide_sample_rank_ref).parameters)
    for f in dataclasses.fields(SamplingConfig):
        assert f"--{f.name.replace('_', '-')}" in res.stdout, f.name
        if f.name.startswith("w_") or f.name in ("temperature", "top_k", "top_p", "seed"):
            assert f.name in kernel_kw, f.name


def test_default_model_is_the_trained_demo(tmp_path):
    ctx = stereo_wav(tmp_path / "ctx.wav", seconds=1.0)
    res = runner.invoke(app, ["generate", str(ctx), "-i", "Bass", "--out", str(tmp_path / "b.wav"), *FAST])
    assert res.exit_code == 0, res.output
    assert "untrained" not in res.stderr and sf.info(tmp_path / "b.wav").frames == 32000
    info = runner.invoke(app, ["info", "demo", "--json"])
    cfg = json.loads(info.stdout)["config"]
    assert cfg["instruments"] == ["bass", "drums", "synth_lead", "synth_pad"] and not cfg["untrained"]
    assert cfg["window"] == 500 and json.loads(info.stdout)["stored_dtype"] == "F16"
