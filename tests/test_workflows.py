"""Regenerating a region, continuing a take, layering, whole folders: as a user runs them."""
import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from stemgen.cli import app
from stemgen.engine import Engine

from helpers import tiny_model_dir

runner = CliRunner()
FAST = ["--steps", "3,2,1,1", "--bits", "float"]
SR = 32000


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("wf"))


def tone(path, seconds, sr=SR, f=220.0):
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * f * t)).astype(np.float32), sr, subtype="FLOAT")
    return path


def gen(model, *args):
    return runner.invoke(app, ["generate", "--model", str(model), *map(str, args), *FAST])


def test_regenerate_keeps_tokens_outside_the_region(model, tmp_path):
    engine = Engine.from_pretrained(model, device="cpu", dtype="float32")
    ctx_audio = np.sin(np.linspace(0, 900, 3 * SR))[None].astype(np.float32) * 0.3
    take_audio = np.sin(np.linspace(0, 300, 3 * SR))[None].astype(np.float32) * 0.3
    _, ctx = engine.prepare_context(ctx_audio, SR)
    _, take = engine.encode(take_audio, SR)
    target = engine.partial_target(take, ctx.shape[-1], [(1.0, 2.0)])
    masked = (target == engine.mask_id).all(0)
    assert masked.sum() == engine.frames(1.0) and masked[engine.frames(1.0)] and not masked[0]
    out = engine.generate_tokens(ctx, "bass", target=target, steps=(3, 2, 1, 1))
    assert torch.equal(out[:, ~masked], take[:, ~masked])          # kept frames bit-identical
    assert not torch.equal(out[:, masked], take[:, masked])        # the region was regenerated
    # continuation: a shorter take is kept and continued to the context's length
    short = engine.partial_target(take[:, :50], ctx.shape[-1])
    cont = engine.generate_tokens(ctx, "bass", target=short, steps=(3, 2, 1, 1))
    assert torch.equal(cont[:, :50], take[:, :50]) and cont.shape == take.shape


def test_regenerate_cli_and_its_errors(model, tmp_path):
    ctx, take = tone(tmp_path / "ctx.wav", 3.0), tone(tmp_path / "take.wav", 3.0, f=110)
    out = tmp_path / "new.wav"
    res = gen(model, ctx, "-i", "bass", "--keep", take, "--regenerate", "1.0:2.0", "--out", out)
    assert res.exit_code == 0, res.output
    new, _ = sf.read(out)
    old, _ = sf.read(take)
    assert len(new) == len(old)
    far = np.r_[0:int(0.9 * SR), int(2.1 * SR):len(old)]   # outside the region and its seams: the take itself
    assert np.allclose(new[far], old[far], atol=1e-6) and not np.allclose(new[SR + 3200:2 * SR - 3200],
                                                                          old[SR + 3200:2 * SR - 3200], atol=1e-3)
    for extra, needle in ((["--regenerate", "2:1"], "start < end"), (["--regenerate", "1:2,1.5:2.5"], "overlap"),
                          (["--regenerate", "2:9"], "ends after"), (["--regenerate", "x"], "START:END")):
        r = gen(model, ctx, "-i", "bass", "--keep", take, "--out", tmp_path / "e.wav", *extra)
        assert r.exit_code == 1 and r.stderr.startswith("error:") and needle in r.stderr, r.output
    tone(tmp_path / "long.wav", 4.0)
    r = gen(model, ctx, "-i", "bass", "--keep", tmp_path / "long.wav", "--out", tmp_path / "e.wav")
    assert r.exit_code == 1 and "longer than the context" in r.stderr
    tone(tmp_path / "t16.wav", 3.0, sr=16000)
    r = gen(model, ctx, "-i", "bass", "--keep", tmp_path / "t16.wav", "--out", tmp_path / "e.wav")
    assert r.exit_code == 1 and "16000 Hz" in r.stderr
    assert not (tmp_path / "e.wav").exists()


def test_layering_equals_single_runs_on_the_mix_before(model, tmp_path):
    ctx = tone(tmp_path / "ctx.wav", 2.0)
    out = tmp_path / "layers"
    res = gen(model, ctx, "-i", "drums,bass", "--out", out, "--seed", 5)
    assert res.exit_code == 0, res.output
    drums, _ = sf.read(out / "1_drums.wav", dtype="float32")
    single = tmp_path / "d.wav"
    assert gen(model, ctx, "-i", "drums", "--out", single, "--seed", 5, "--mix", tmp_path / "m1.wav").exit_code == 0
    assert np.array_equal(sf.read(single, dtype="float32")[0], drums)
    bass_alone = tmp_path / "b.wav"
    assert gen(model, tmp_path / "m1.wav", "-i", "bass", "--out", bass_alone, "--seed", 5).exit_code == 0
    bass, _ = sf.read(out / "2_bass.wav", dtype="float32")
    # the mix file is written peak-safe (scaled only if it would clip): equal when it did not clip
    assert np.allclose(sf.read(bass_alone, dtype="float32")[0], bass, atol=1e-5)
    assert (out / "mix.wav").is_file()


def test_folder_run_equals_single_runs_and_skips_bad_files(model, tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    for i in range(5):
        tone((src / "sub" if i % 2 else src) / f"c{i}.wav", 0.5 + 0.3 * i, f=110 * (i + 1))
    (src / "broken.wav").write_bytes(b"not audio")
    out = tmp_path / "out"
    res = gen(model, src, "-i", "bass", "--out", out, "--seed", 2)
    assert res.exit_code == 0, res.output
    assert "5 of 6 files written" in res.stdout and "broken.wav" in res.stderr
    for i in range(5):
        rel = ("sub/" if i % 2 else "") + f"c{i}.wav"
        single = tmp_path / f"s{i}.wav"
        assert gen(model, src / rel, "-i", "bass", "--out", single, "--seed", 2).exit_code == 0
        assert np.array_equal(sf.read(single)[0], sf.read(out / rel)[0]), rel
    again = gen(model, src, "-i", "bass", "--out", out)
    assert "0 of 6 files written" in again.stdout and "5 existed" in again.stdout
    r = gen(model, src, "-i", "bass", "--out", src / "o")
    assert r.exit_code == 1 and "inside the input folder" in r.stderr
    (tmp_path / "empty").mkdir()
    r = gen(model, tmp_path / "empty", "-i", "bass", "--out", tmp_path / "o2")
    assert r.exit_code == 1 and "no audio files" in r.stderr


def test_long_form_windows_continue_each_other(model):
    engine = Engine.from_pretrained(model, device="cpu", dtype="float32")
    assert engine.windows(100, 40, 10) == [(0, 40, 0), (30, 70, 10), (60, 100, 10)]
    assert engine.windows(35, 40, 10) == [(0, 35, 0)]
    assert engine.windows(95, 40, 10)[-1] == (55, 95, 15)     # the last window ends at T, full length
    with pytest.raises(ValueError, match="overlap"):
        engine.windows(100, 40, 40)
    audio = (np.sin(np.linspace(0, 4000, 4 * SR)) * 0.3)[None].astype(np.float32)   # 200 frames
    x, ctx = engine.prepare_context(audio, SR)
    seen = []
    real_run = __import__("stemgen.engine.api", fromlist=["run_requests"]).run_requests

    def spy(runner, reqs, max_frames):
        seen.append((reqs[0].context.shape[-1], reqs[0].given.clone()))
        return real_run(runner, reqs, max_frames)

    import stemgen.engine.api as api
    api.run_requests, saved = spy, api.run_requests
    try:
        gen = engine.generate_long(x, ctx, "bass", window=80, overlap=20,
                                   sampling=engine.sampling(steps=(3, 2, 1, 1)))
    finally:
        api.run_requests = saved
    assert gen.stem.shape == x.shape and gen.tokens.shape == (4, 200)
    assert all(T <= 80 for T, _ in seen) and len(seen) == 3     # attention never sees more than a window
    # each window's first overlap frames were fixed to the tokens the previous window produced
    plan = engine.windows(200, 80, 20)
    for (a, b, fixed), (_, given) in zip(plan[1:], seen[1:]):
        assert torch.equal(given[:, :fixed], gen.tokens[:, a:a + fixed])
        assert (given[:, fixed:] == engine.mask_id).all()


def test_codec_chunks_match_one_pass_away_from_seams(model, monkeypatch):
    import stemgen.engine.codec as codec_mod

    engine = Engine.from_pretrained(model, device="cpu", dtype="float32")
    audio = torch.from_numpy((np.sin(np.linspace(0, 3000, 6 * SR)) * 0.3).astype(np.float32))[None, None]
    whole = engine.codec.encode(audio)
    monkeypatch.setattr(codec_mod, "CHUNK_FRAMES", 60)
    monkeypatch.setattr(codec_mod, "MARGIN_FRAMES", 40)
    chunked = engine.codec.encode(audio)
    assert chunked.shape == whole.shape
    assert (chunked == whole).all(1).float().mean() >= 0.97
    dec_chunked = engine.codec.decode(whole)
    monkeypatch.setattr(codec_mod, "CHUNK_FRAMES", 10 ** 6)
    dec_whole = engine.codec.decode(whole)
    assert dec_chunked.shape == dec_whole.shape
    err = float((dec_chunked - dec_whole).pow(2).mean().sqrt() / dec_whole.pow(2).mean().sqrt())
    assert err < 0.02, err


def test_long_context_cli(model, tmp_path):
    ctx = tone(tmp_path / "long.wav", 5.0, sr=44100)
    res = gen(model, ctx, "-i", "bass", "--out", tmp_path / "s.wav", "--window", "2", "--overlap", "0.5")
    assert res.exit_code == 0, res.output
    assert "windows of 2.0 s" in res.stderr and sf.info(tmp_path / "s.wav").frames == 5 * SR


def test_list_run_refuses_an_input_at_its_own_output_path(model, tmp_path):
    """A listed input that sits where its stem would be written: refused in one line (with --force it
    was overwritten), nothing written."""
    out = tmp_path / "out"
    out.mkdir()
    inside = tone(out / "a.wav", 1.0)
    before = inside.read_bytes()
    other = tone(tmp_path / "b.wav", 1.0)
    lst = tmp_path / "list.txt"
    lst.write_text(f"{inside}\n{other}\n")
    for force in ([], ["--force"]):
        res = gen(model, lst, "-i", "bass", "--out", out, *force)
        assert res.exit_code == 1 and res.stderr.startswith("error:") and "is also the input" in res.stderr, res.output
        assert len(res.stderr.strip().splitlines()) == 1
    assert inside.read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["a.wav"]


def test_keep_with_variations_writes_every_variation(model, tmp_path):
    """--keep TAKE -n 2: two variations of the edit (seeds seed, seed+1), each the single run with its
    seed; the take outside the region in both (was: one file written and two reported)."""
    ctx, take = tone(tmp_path / "ctx.wav", 3.0), tone(tmp_path / "take.wav", 3.0, f=110)
    res = gen(model, ctx, "-i", "bass", "--keep", take, "--regenerate", "1.0:2.0", "--out", tmp_path / "new.wav",
              "-n", "2")
    assert res.exit_code == 0, res.output
    a, b = (sf.read(tmp_path / f"new_{i}.wav")[0] for i in (1, 2))
    single = gen(model, ctx, "-i", "bass", "--keep", take, "--regenerate", "1.0:2.0", "--out", tmp_path / "s.wav",
                 "--seed", "1")
    assert single.exit_code == 0, single.output
    assert np.array_equal(b, sf.read(tmp_path / "s.wav")[0]) and not np.array_equal(a, b)
    old, _ = sf.read(take)
    far = np.r_[0:int(0.9 * SR), int(2.1 * SR):len(old)]
    assert np.allclose(a[far], old[far], atol=1e-6) and np.allclose(b[far], old[far], atol=1e-6)


@pytest.mark.parametrize("opt, needle", [(["--window", "nan"], "--window nan"), (["--window", "inf"], "--window inf"),
                                         (["--window", "0"], "--window 0 s is 0 frames"),
                                         (["--window", "0.001"], "is 0 frames"), (["--window", "-2"], "--window -2"),
                                         (["--overlap", "nan"], "--overlap nan"),
                                         (["--window", "1", "--overlap", "1e300"], "--overlap 1e+300")])
def test_window_options_are_checked(model, tmp_path, opt, needle):
    res = gen(model, tone(tmp_path / "c.wav", 1.0), "-i", "bass", "--out", tmp_path / "o.wav", *opt)
    assert res.exit_code == 1 and res.stderr.startswith("error:") and needle in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "o.wav").exists()


def test_folder_run_reports_a_link_out_of_the_folder_and_goes_on(model, tmp_path):
    src = tmp_path / "ctx"
    src.mkdir()
    tone(src / "a.wav", 0.5)
    tone(src / "b.wav", 0.5, f=330)
    (src / "away.wav").symlink_to(tone(tmp_path / "elsewhere.wav", 0.5))
    res = gen(model, src, "-i", "bass", "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.wav", "b.wav"]
    assert "away.wav" in res.stderr and "outside the input folder" in res.stderr and "Traceback" not in res.output
    assert "2 of 3 files written" in res.stdout and "1 failed" in res.stdout


def test_folder_inputs_that_share_an_output_are_both_named(model, tmp_path):
    """a.wav and a.flac in one folder would both write OUT/a.wav: one line naming both, nothing written."""
    src = tmp_path / "ctx"
    src.mkdir()
    tone(src / "a.wav", 0.5)
    sf.write(src / "a.flac", np.zeros(SR // 2), SR)
    res = gen(model, src, "-i", "bass", "--out", tmp_path / "out")
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert f"would be the output of both {src / 'a.flac'} and {src / 'a.wav'}" in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()
