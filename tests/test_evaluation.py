"""Evaluation: Frechet distance maths, descriptors vs the toy-band ground truth, MIRDD ranking,
corpus layout and `stemgen eval` / `stemgen make-corpus`."""
import hashlib
import json

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from stemgen.cli import app
from stemgen.evaluation import dsp
from stemgen.evaluation.corpus import PITCH_NAMES, context_and_stem, load_track, make_song, render_song, render_stem
from stemgen.evaluation.fad import fad, frechet_distance, gaussian
from stemgen.evaluation.mirdd import mirdd

runner = CliRunner()


def random_rotation(d, rng):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q


def test_frechet_identical_is_zero():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 8))
    assert abs(fad(x, x)) < 1e-8


def test_frechet_closed_form_and_symmetry():
    """Covariances sharing eigenvectors: d = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2."""
    rng = np.random.default_rng(1)
    d = 6
    rot = random_rotation(d, rng)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    c1, c2 = rot @ np.diag(a) @ rot.T, rot @ np.diag(b) @ rot.T
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(want, rel=1e-9)
    c3 = rng.standard_normal((d, d))
    c3 = c3 @ c3.T
    assert frechet_distance(mu1, c1, mu2, c3) == pytest.approx(frechet_distance(mu2, c3, mu1, c1), rel=1e-9)


def test_frechet_rank_deficient_is_stable():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((3, 40)), rng.standard_normal((4, 40)) + 0.5   # fewer samples than dims
    d1, d2 = fad(x, y), fad(y, x)
    assert np.isfinite(d1) and d1 > 0 and d1 == pytest.approx(d2, rel=1e-6)
    mu, cov = gaussian(x[:1])
    assert cov.shape == (40, 40) and not cov.any()


@pytest.fixture(scope="module")
def analysed():
    out = []
    for i in range(30):
        song = make_song(np.random.default_rng([3, i]))
        stems = render_song(song, 22050, seed=i)
        out.append((song, dsp.describe(sum(stems.values()), 22050, bar_seconds=song.bar_s)))
    return out


def test_descriptors_recover_ground_truth(analysed):
    tempo_ok = np.mean([abs(d["tempo"] - s.tempo) <= 2 for s, d in analysed])
    key_ok = np.mean([(d["tonic"], d["mode"]) == (s.tonic, s.mode) for s, d in analysed])
    roots = np.mean([np.mean([c.rstrip("m") == PITCH_NAMES[r] for c, (r, _) in zip(d["chords"], s.chords)])
                     for s, d in analysed])
    meter_ok = np.mean([d["beats_per_bar"] == s.beats_per_bar for s, d in analysed])
    assert tempo_ok >= 0.9, tempo_ok
    assert key_ok >= 0.8, key_ok
    assert roots >= 0.75, roots
    assert meter_ok >= 0.8, meter_ok


def test_mirdd_ranks_real_above_wrong_key_and_off_beat():
    """Reference: real bass + context of 16 songs. Same distribution (real bass + context of 16
    other songs) must score clearly lower than those songs' bass transposed to wrong keys or
    shifted half a beat."""
    sr, pops = 22050, {"ref": [], "same": [], "transposed": [], "shifted": []}
    for i in range(32):
        song = make_song(np.random.default_rng([7, i]))
        rng = np.random.default_rng(i)
        ctx = sum(g * render_stem(song.notes[s], s, song.duration, sr, rng) for s, g in
                  (("S00", 0.5), ("S02", 0.2), ("S03", 0.2)))

        def bass(**kw):
            return 0.35 * render_stem(song.notes["S01"], "S01", song.duration, sr, np.random.default_rng(0), **kw)
        if i < 16:
            pops["ref"].append(dsp.describe(ctx + bass(), sr))
            continue
        pops["same"].append(dsp.describe(ctx + bass(), sr))
        pops["transposed"].append(dsp.describe(ctx + bass(transpose=int(rng.choice([-5, -3, -1, 1, 2, 3, 4, 6]))), sr))
        pops["shifted"].append(dsp.describe(ctx + bass(shift=0.5 * 60 / song.tempo), sr))
    same = mirdd(pops["same"], pops["ref"])[0]
    assert 1.3 * same < mirdd(pops["transposed"], pops["ref"])[0]
    assert 1.3 * same < mirdd(pops["shifted"], pops["ref"])[0]


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_make_corpus_layout_deterministic_and_loadable(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        res = runner.invoke(app, ["make-corpus", str(out), "--songs", "2", "--seed", "5", "--sr", "22050"])
        assert res.exit_code == 0, res.output
    assert digest(a) == digest(b)
    track = a / "Track00001"
    assert (track / "mix.wav").is_file() and sorted(p.name for p in (track / "stems").iterdir()) == \
        ["S00.wav", "S01.wav", "S02.wav", "S03.wav"]
    meta, stems = load_track(track)
    assert meta["stems"]["S01"]["inst_class"] == "Bass" and meta["ground_truth"]["key"]
    ctx, stem, sr = context_and_stem(track, "Bass")
    assert sr == 22050 and len(ctx) == len(stem) and np.abs(stem).max() > 0
    res = runner.invoke(app, ["make-corpus", str(a), "--songs", "1"])
    assert res.exit_code != 0 and "not empty" in res.stderr


def export(tmp_path, songs, offset):
    """generated/ reference/ context/ folders from toy songs (bass stems)."""
    ctx_dir, stem_dir = tmp_path / f"ctx{offset}", tmp_path / f"bass{offset}"
    ctx_dir.mkdir(exist_ok=True)
    stem_dir.mkdir()
    for i in range(songs):
        song = make_song(np.random.default_rng([9, offset + i]))
        st = render_song(song, 22050, seed=i)
        sf.write(stem_dir / f"song{i}.wav", st["S01"], 22050)
        sf.write(ctx_dir / f"song{i}.wav", st["S00"] + st["S02"] + st["S03"], 22050)
    return stem_dir, ctx_dir


def test_eval_cli(tmp_path):
    gen, ctx = export(tmp_path, 3, 0)
    ref, _ = export(tmp_path, 3, 100)
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["eval", "--generated", str(gen), "--reference", str(ref), "--context", str(ctx),
                              "--json", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    # different songs: both distances clearly above the self-comparison's 0 (checked below)
    assert rep["fad"] > 1e-3 and rep["mirdd"] > 1e-3 and "key" in rep["mirdd_table"] and rep["with_context"]
    self_rep = runner.invoke(app, ["eval", "--generated", str(gen), "--reference", str(gen)])
    assert self_rep.exit_code == 0 and "0.0000" in self_rep.stdout


def test_eval_bad_inputs(tmp_path):
    gen, ctx = export(tmp_path, 2, 0)
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, ["eval", "--generated", str(empty), "--reference", str(gen)])
    assert res.exit_code != 0 and "no audio files" in res.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.wav").write_text("not audio")
    (bad / "b.wav").write_text("not audio")
    res = runner.invoke(app, ["eval", "--generated", str(bad), "--reference", str(gen)])
    assert res.exit_code != 0 and "not a readable audio file" in res.stderr
    (ctx / "song1.wav").unlink()
    res = runner.invoke(app, ["eval", "--generated", str(gen), "--reference", str(gen), "--context", str(ctx)])
    assert res.exit_code != 0 and "no context file" in res.stderr and "song1.wav" in res.stderr
    one = tmp_path / "one"
    one.mkdir()
    sf.write(one / "x.wav", np.zeros(22050), 22050)
    res = runner.invoke(app, ["eval", "--generated", str(one), "--reference", str(gen)])
    assert res.exit_code != 0 and "at least 2" in res.stderr
    res = runner.invoke(app, ["eval", "--generated", str(tmp_path / "nope"), "--reference", str(gen)])
    assert res.exit_code != 0 and "not a folder" in res.stderr


def _torchvggish_modules():
    """The torchvggish package's model and mel modules, loaded from their files (its __init__
    imports resampy/numba, which these checks do not need)."""
    import importlib.util
    from pathlib import Path

    root = Path(importlib.util.find_spec("torchvggish").submodule_search_locations[0])
    mods = {}
    for name in ("torchvggish", "mel_features"):
        spec = importlib.util.spec_from_file_location(f"_tv_{name}", root / f"{name}.py")
        mods[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mods[name])
    return mods


def test_vggish_matches_torchvggish(tmp_path):
    """Our log-mel frontend and network against the torchvggish port, random weights saved as its
    checkpoint format, converted by `stemgen convert-vggish`."""
    import torch

    from stemgen.evaluation.fad import log_mel
    from stemgen.evaluation.vggish import VGGishEmbedder, examples

    tv = _torchvggish_modules()
    torch.manual_seed(0)
    ref_net = tv["torchvggish"]._vgg(postprocess=False).eval()
    ckpt = tmp_path / "vggish-test.pth"
    torch.save(ref_net.state_dict(), ckpt)
    out = tmp_path / "vggish.safetensors"
    res = runner.invoke(app, ["convert-vggish", str(ckpt), "--out", str(out)])
    assert res.exit_code == 0, res.output

    rng = np.random.default_rng(0)
    x = 0.3 * np.sin(2 * np.pi * 440 * np.arange(32000) / 16000) + 0.05 * rng.standard_normal(32000)
    want_lm = tv["mel_features"].log_mel_spectrogram(x, audio_sample_rate=16000, log_offset=0.01,
                                                     window_length_secs=0.025, hop_length_secs=0.010,
                                                     num_mel_bins=64, lower_edge_hertz=125, upper_edge_hertz=7500)
    got_lm = log_mel(x)
    assert got_lm.shape == want_lm.shape and np.abs(got_lm - want_lm).max() < 1e-6
    emb = VGGishEmbedder(out)(x, 16000)
    with torch.no_grad():
        want = ref_net(torch.from_numpy(examples(x, 16000)).float()[:, None]).numpy()
    assert np.abs(want).max() > 0, "degenerate reference embedding"
    assert emb.shape == (2, 128) and np.abs(emb - want).max() <= 1e-5 * np.abs(want).max()
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(3)}, bad)
    res = runner.invoke(app, ["convert-vggish", str(bad), "--out", str(tmp_path / "x.safetensors")])
    assert res.exit_code != 0 and "features.0.weight" in res.stderr


def test_export_pairs_then_eval(tmp_path):
    corpus = tmp_path / "toy"
    assert runner.invoke(app, ["make-corpus", str(corpus), "--songs", "3", "--sr", "22050"]).exit_code == 0
    res = runner.invoke(app, ["export-pairs", str(corpus), "--instrument", "Bass", "--out", str(tmp_path / "pairs")])
    assert res.exit_code == 0, res.output
    ctx = sorted(p.name for p in (tmp_path / "pairs" / "context").iterdir())
    assert ctx == ["Track00001.wav", "Track00002.wav", "Track00003.wav"]
    stem, sr = sf.read(tmp_path / "pairs" / "stem" / "Track00001.wav")
    meta, stems = load_track(corpus / "Track00001")
    assert sr == 22050 and np.allclose(stem, stems["S01"][0], atol=1e-4)
    res = runner.invoke(app, ["eval", "--generated", str(tmp_path / "pairs" / "stem"), "--reference",
                              str(tmp_path / "pairs" / "stem"), "--context", str(tmp_path / "pairs" / "context")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["export-pairs", str(corpus), "--instrument", "Kazoo", "--out", str(tmp_path / "p2")])
    assert res.exit_code != 0 and "Kazoo" in res.stderr and not (tmp_path / "p2").exists()
