"""Table 3 at toy scale: the ground-truth metrics recognise the real stems and reject wrong ones,
and `stemgen table3` writes every setting, the table and the figure."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from stemgen.cli import app
from stemgen.evaluation import listening
from stemgen.evaluation.corpus import make_corpus, make_song, metadata, render_stem

from helpers import tiny_model_dir

SR = 22050


@pytest.fixture(scope="module")
def song():
    rng = np.random.default_rng([3, 0])
    s = make_song(rng)
    return s, metadata(s, SR)["ground_truth"]


def render(s, stem, **kw):
    return render_stem(s.notes[stem], stem, s.duration, SR, np.random.default_rng(0), **kw)


def test_chord_root_agreement_tells_right_from_wrong(song):
    s, gt = song
    assert listening.chord_root_agreement(render(s, "S01"), SR, gt) >= 0.85
    assert listening.chord_root_agreement(render(s, "S01", transpose=2), SR, gt) <= 0.25   # a tone off
    assert listening.chord_root_agreement(np.zeros(int(s.duration * SR)), SR, gt) == 0.0


def test_beat_alignment_and_tempo_tell_right_from_wrong(song):
    s, gt = song
    on, chance = listening.beat_alignment(render(s, "S00"), SR, gt)
    step = 60 / gt["tempo"] / 2
    off, _ = listening.beat_alignment(render(s, "S00", shift=step / 2), SR, gt)   # half an eighth late
    assert on >= 0.9 and off <= 0.2 and 0 < chance < 1
    assert listening.tempo_agreement(render(s, "S00"), SR, gt) == 1.0
    slow = {**gt, "tempo": gt["tempo"] * 0.8}
    assert listening.tempo_agreement(render(s, "S00"), SR, slow) == 0.0


def test_table3_cli_writes_every_setting(tmp_path):
    model = tiny_model_dir(tmp_path)
    corpus = make_corpus(tmp_path / "held", songs=2, seed=1000, sr=16000)
    out = tmp_path / "t3"
    res = CliRunner().invoke(app, ["table3", "--model", str(model), "--corpus", str(corpus), "--out", str(out),
                                   "--songs", "2", "--seconds", "2", "--steps", "1,1,1,1"])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "table3.json").read_text())
    assert set(rep["table"]) == {"bass", "drums"}
    for inst in ("bass", "drums"):
        assert set(rep["table"][inst]) == set(listening.SETTINGS)
        for setting in listening.SETTINGS:
            assert len(list((out / setting / inst).glob("*.wav"))) == 2
    assert len(rep["per_song"]) == 2 * 2 * 5 and "chord_root" in rep["table"]["bass"]["paper"]
    assert (out / "spectrograms.png").stat().st_size > 10000 and "| bass | default |" in (out / "table3.md").read_text()


def test_table3_default_is_the_models_own_sampling(tmp_path):
    """The default setting (and deaf) sample with the model directory's own defaults: a model whose
    config.json says no guidance and a random ranking writes the naive stems, not the paper's."""
    import soundfile as sf

    model = tiny_model_dir(tmp_path)
    cfg = json.loads((model / "config.json").read_text())
    cfg["sampling"] = {**(cfg.get("sampling") or {}), "guidance": "none", "w_confidence": 0.0, "w_causal": 0.0}
    (model / "config.json").write_text(json.dumps(cfg))
    corpus = make_corpus(tmp_path / "held", songs=2, seed=1000, sr=16000)
    out = tmp_path / "t3"
    res = CliRunner().invoke(app, ["table3", "--model", str(model), "--corpus", str(corpus), "--out", str(out),
                                   "--songs", "2", "--seconds", "2", "--steps", "3,2,1,1", "--stems", "bass",
                                   "--settings", "naive,paper,default"])
    assert res.exit_code == 0, res.output
    wav = lambda setting, i: sf.read(out / setting / "bass" / f"Track{i:05d}.wav")[0]  # noqa: E731
    for i in (1, 2):
        assert np.array_equal(wav("default", i), wav("naive", i))
    assert not all(np.array_equal(wav("default", i), wav("paper", i)) for i in (1, 2))


def test_table3_cli_runs_a_subset(tmp_path):
    """--stems / --settings run only those (here with the CPU's int8 path; no figure, which needs both stems, paper and deaf);
    an unknown name is one line."""
    model = tiny_model_dir(tmp_path)
    corpus = make_corpus(tmp_path / "held", songs=2, seed=1000, sr=16000)
    out = tmp_path / "t3"
    args = ["table3", "--model", str(model), "--corpus", str(corpus), "--out", str(out), "--songs", "2",
            "--seconds", "2", "--steps", "1,1,1,1"]
    res = CliRunner().invoke(app, args + ["--stems", "bass", "--settings", "naive,paper", "--dtype", "int8"])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "table3.json").read_text())
    assert rep["dtype"] == "int8" and set(rep["table"]) == {"bass"} and set(rep["table"]["bass"]) == {"naive", "paper"}
    assert len(rep["per_song"]) == 2 * 2 and not (out / "deaf").exists() and not (out / "real" / "drums").exists()
    assert not (out / "spectrograms.png").exists()
    res = CliRunner().invoke(app, args + ["--settings", "naive,clever"])
    assert res.exit_code == 1 and "clever" in res.output and res.output.count("\n") == 1, res.output


class _PassThrough:
    """A 'codec' whose codes are the waveform itself (one level): a lossless round trip."""
    class cfg:
        sample_rate = 32000

    def encode(self, x):
        return x

    def decode(self, codes):
        return codes


def test_codec_harmony_reads_what_survives_the_codec(tmp_path):
    """`stemgen codec-harmony`: the chord reader gets the rendered pad and context right; a lossless
    round trip scores exactly the same; a random tiny codec loses the chords; bad input is one line."""
    from stemgen.engine.codec import Codec, CodecConfig
    from stemgen.random_model import random_codec_weights

    corpus = make_corpus(tmp_path / "toy", songs=2, seed=4, sr=32000)
    lossless = listening.codec_harmony(_PassThrough(), corpus, songs=2)
    assert lossless["pad"] >= 0.9 and lossless["context"] >= 0.9 and lossless["bars"] >= 12
    assert lossless["pad through the codec"] == lossless["pad"]
    assert lossless["context through the codec"] == lossless["context"]
    assert lossless["bass through the codec (ceiling)"] >= 0.9
    cfg = CodecConfig(n_filters=4, dimension=16, bins=64, lstm_layers=1)
    lossy = listening.codec_harmony(Codec(cfg, random_codec_weights(cfg, 0)), corpus, songs=2)
    assert lossy["pad"] == lossless["pad"] and lossy["pad through the codec"] < 0.5
    res = CliRunner().invoke(app, ["codec-harmony", str(tmp_path / "nope"), "--corpus", str(corpus)])
    assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
    from pathlib import Path

    import stemgen.engine

    demo = Path(stemgen.engine.__file__).parent / "demo_model"
    res = CliRunner().invoke(app, ["codec-harmony", str(demo), "--corpus", str(tmp_path)])
    assert res.exit_code == 1 and "no Track" in res.output and res.output.count("\n") == 1, res.output
