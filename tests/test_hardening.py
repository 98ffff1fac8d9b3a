"""Hostile files, bad requests and faults (issue: hardening): one `error:` line, the right exit
code, no file created or changed; the service keeps serving everyone else."""
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from stemgen.cli import app
from stemgen.engine import Engine
from stemgen.engine.errors import StemGenError
from stemgen.train import StemGenConfig, save_checkpoint

from helpers import random_train_model, tiny_model_dir

runner = CliRunner()
FAST = ["--steps", "2,1,1,1"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("m"))


def wav(path, seconds=1.0, sr=16000):
    t = np.arange(int(sr * seconds)) / sr
    sf.write(path, 0.3 * np.sin(2 * np.pi * 220 * t), sr)
    return path


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def one_line_error(res, *needles, code=1):
    assert res.exit_code == code, (res.exit_code, res.output)
    err = res.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert "Traceback" not in res.output
    for n in needles:
        assert n in err, (n, err)


def edit_config(model, tmp_path, edit):
    bad = tmp_path / "bad"
    shutil.copytree(model, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg = edit(cfg)
    (bad / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return bad


def _set(path, value):
    def edit(cfg):
        node = cfg
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        return cfg
    return edit


CONFIG_CASES = [
    (lambda c: [], "must be an object"),
    (_set(["lm"], None), "lm"),
    (_set(["lm", "d_model"], "256"), "d_model: must be an integer"),
    (_set(["lm", "n_heads"], 0), "n_heads: 0 is out of range"),
    (_set(["weights", "lm"], None), "weights.lm"),
    (_set(["instruments"], [1, 2, 3]), "instruments[0]"),
    (_set(["sampling"], [1]), "sampling"),
    (_set(["sampling"], {"cfg_context": "x"}), "cfg_context"),
    (_set(["sampling", "guidance"], "magnet"), "guidance 'magnet' is MAGNeT's; a StemGen model takes multi"),
    (lambda c: "[" * 100000 + "]" * 100000, "nested too deeply"),
    (_set(["lm", "n_layers"], 10 ** 9), "n_layers: 1000000000 is out of range"),
    (_set(["codec", "n_q"], 10 ** 9), "n_q"),
    (_set(["codec", "lstm_layers"], 10 ** 8), "lstm_layers"),
    (_set(["codec", "sample_rate"], 10 ** 9), "sample_rate"),
    (_set(["weights", "lm"], "/etc/passwd"), "plain file name"),
    (_set(["weights", "codec"], "../codec.safetensors"), "plain file name"),
    (_set(["lm", "rope_theta"], float("nan")), "rope_theta"),
]


@pytest.mark.parametrize("edit, needle", CONFIG_CASES)
def test_hostile_config_one_line_for_info_and_generate(model, tmp_path, edit, needle):
    bad = edit_config(model, tmp_path, edit)
    before = snapshot(bad)
    one_line_error(runner.invoke(app, ["info", str(bad)]), needle)
    ctx = wav(tmp_path / "c.wav")
    res = runner.invoke(app, ["generate", str(ctx), "-i", "bass", "--out", str(tmp_path / "o.wav"), "--model",
                              str(bad), *FAST])
    one_line_error(res, needle)
    assert not (tmp_path / "o.wav").exists() and snapshot(bad) == before


def test_nan_weights_rejected_at_convert_and_load(model, tmp_path):
    cfg = StemGenConfig(d_model=32, n_heads=2, n_layers=1, codebook_size=16, ffn_multiple_of=16)
    lm = random_train_model(cfg)
    with torch.no_grad():
        lm.layers[0].attn.wq.weight[3, 5] = float("nan")
    save_checkpoint(lm, tmp_path / "nan.pt")
    res = runner.invoke(app, ["convert", "--lm", str(tmp_path / "nan.pt"), "--out", str(tmp_path / "out")])
    one_line_error(res, "layers.0.attn.wq.weight", "NaN")
    assert not (tmp_path / "out").exists()
    bad = tmp_path / "bad"
    shutil.copytree(model, bad)
    w = load_file(bad / "lm.safetensors")
    w["norm"][0] = float("inf")
    save_file(w, bad / "lm.safetensors")
    res = runner.invoke(app, ["generate", str(wav(tmp_path / "c.wav")), "-i", "bass", "--out",
                              str(tmp_path / "o.wav"), "--model", str(bad), *FAST])
    one_line_error(res, "'norm'", "NaN or infinite")


def test_training_checkpoint_with_huge_sizes(tmp_path):
    cfg = StemGenConfig(d_model=32, n_heads=2, n_layers=1, codebook_size=16, ffn_multiple_of=16)
    lm = random_train_model(cfg)
    save_checkpoint(lm, tmp_path / "a.pt")
    ck = torch.load(tmp_path / "a.pt", weights_only=True)
    for field, value, needle in (("n_layers", 10 ** 9, "n_layers"), ("extra_cond_sizes", [-3], "extra_cond_sizes"),
                                 ("d_model", "32", "d_model")):
        ck2 = {**ck, "config": {**ck["config"], field: value}}
        torch.save(ck2, tmp_path / "b.pt")
        res = runner.invoke(app, ["convert", "--lm", str(tmp_path / "b.pt"), "--out", str(tmp_path / "out")])
        one_line_error(res, needle)
        assert not (tmp_path / "out").exists()


AUDIOCRAFT_CFG = "sample_rate: 32000\nseanet: {n_filters: 4, dimension: 16, ratios: [8, 5, 4, 4], lstm: 1}\n" \
                 "rvq: {n_q: 4, bins: 32}\n"


@pytest.mark.parametrize("obj, needle", [
    ({"best_state": [1, 2], "xp.cfg": AUDIOCRAFT_CFG}, "best_state is a list"),
    ({"best_state": {3: torch.zeros(2)}, "xp.cfg": AUDIOCRAFT_CFG}, "not a tensor name"),
    ({"best_state": {}, "xp.cfg": 5}, "xp.cfg must be the YAML text"),
    ({"best_state": {}, "xp.cfg": "seanet: {n_filters: 4}\nrvq: {n_q: 4}\n"}, "no sample_rate"),
    ({"best_state": {"encoder.model.0.conv.conv.weight_g": torch.ones(4, 1, 1),
                     "encoder.model.0.conv.conv.weight_v": torch.ones(5, 1, 7)}, "xp.cfg": AUDIOCRAFT_CFG},
     "does not match weight_v"),
])
def test_malformed_codec_sources(tmp_path, obj, needle):
    from stemgen.weights_convert.codec import convert_codec

    src = tmp_path / "compression_state_dict.bin"
    torch.save(obj, src)
    with pytest.raises(StemGenError, match=needle):
        convert_codec(src)


def test_markup_in_user_text_is_printed_verbatim(model, tmp_path):
    res = runner.invoke(app, ["generate", str(tmp_path / "no[/]such.wav"), "-i", "bass", "--out",
                              str(tmp_path / "o.wav"), "--model", str(model)])
    one_line_error(res, "no[/]such.wav")
    res = runner.invoke(app, ["generate", str(wav(tmp_path / "c.wav")), "-i", "[/]", "--out", str(tmp_path / "o.wav"),
                              "--model", str(model), *FAST])
    one_line_error(res, "'[/]'", "[/]x")


def test_audio_header_limits(model, tmp_path):
    low = tmp_path / "low.wav"
    sf.write(low, np.zeros(100), 100)  # 100 Hz: would expand 320x when resampled
    res = runner.invoke(app, ["generate", str(low), "-i", "bass", "--out", str(tmp_path / "o.wav"), "--model",
                              str(model), *FAST])
    one_line_error(res, "sample rate 100 Hz")
    long = wav(tmp_path / "long.wav", seconds=3.0)
    res = runner.invoke(app, ["generate", str(long), "-i", "bass", "--out", str(tmp_path / "o.wav"), "--model",
                              str(model), *FAST], env={"STEMGEN_MAX_SECONDS": "2"})
    one_line_error(res, "longer than the 2 s limit", "STEMGEN_MAX_SECONDS")
    assert not (tmp_path / "o.wav").exists()


def test_decoded_samples_budget(model, tmp_path, monkeypatch):
    """A small file that decodes to gigabytes (8 x 96 kHz x 600 s of FLAC silence: 0.5 MB) is refused
    from its header before any sample is decoded; the resampled length counts too; the budget is
    STEMGEN_MAX_SAMPLES, and a NaN or out-of-range limit variable is an error, not a disabled check."""
    import soundfile

    bomb = tmp_path / "bomb.flac"
    block = np.zeros((96000 * 10, 8), dtype=np.int16)
    with sf.SoundFile(bomb, "w", samplerate=96000, channels=8, format="FLAC", subtype="PCM_16") as f:
        for _ in range(60):
            f.write(block)
    assert bomb.stat().st_size < 1_000_000

    def no_decode(*a, **k):
        raise AssertionError("decoded")

    out = tmp_path / "o.wav"
    base = ["generate", "-i", "bass", "--out", str(out), "--model", str(model), *FAST]
    with monkeypatch.context() as m:
        m.setattr(soundfile, "read", no_decode)
        res = runner.invoke(app, [*base, str(bomb)], env={"STEMGEN_MAX_SECONDS": "1200"})
    one_line_error(res, "460,800,000 samples", "STEMGEN_MAX_SAMPLES")
    low = tmp_path / "low.wav"
    sf.write(low, 0.3 * np.sin(np.arange(12000) / 5), 4000)   # 12,000 samples; 96,000 at 32 kHz
    one_line_error(runner.invoke(app, [*base, str(low)], env={"STEMGEN_MAX_SAMPLES": "50000"}), "resampled")
    for var, value in (("STEMGEN_MAX_SAMPLES", "nan"), ("STEMGEN_MAX_SAMPLES", "0"), ("STEMGEN_MAX_SECONDS", "nan"),
                       ("STEMGEN_MAX_SECONDS", "-1")):
        one_line_error(runner.invoke(app, [*base, str(low)], env={var: value}), var)
    assert not out.exists()
    res = runner.invoke(app, [*base, str(low)], env={"STEMGEN_MAX_SAMPLES": "100000"})
    assert res.exit_code == 0, res.output


def test_output_collisions_and_formats(model, tmp_path):
    ctx = wav(tmp_path / "c.wav")
    before = ctx.read_bytes()
    base = ["generate", str(ctx), "-i", "bass", "--model", str(model), *FAST]
    one_line_error(runner.invoke(app, [*base, "--out", str(ctx)]), "is also the input")
    one_line_error(runner.invoke(app, [*base, "--out", str(tmp_path / "s.wav"), "--mix", str(ctx)]), "is also the input")
    one_line_error(runner.invoke(app, [*base, "--out", str(tmp_path / "x.wav"), "--mix", str(tmp_path / "x.wav")]),
                   "another output")
    one_line_error(runner.invoke(app, [*base, "--out", str(tmp_path / "x.xyz")]), "cannot write .xyz")
    assert ctx.read_bytes() == before and not (tmp_path / "x.wav").exists()
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "s.flac")])
    assert res.exit_code == 0, res.output
    assert sf.info(tmp_path / "s.flac").format == "FLAC"


def test_read_only_output_folder_fails_before_the_work(model, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.geteuid() == 0:  # root may write anywhere: make the permission check see what a user would
        import stemgen.engine.audio as audio
        real = os.access
        monkeypatch.setattr(audio.os, "access", lambda p, m: False if str(p) == str(ro) else real(p, m))
    import stemgen.engine.api as api
    monkeypatch.setattr(api.Engine, "generate_from_context", lambda *a, **k: pytest.fail("generated first"))
    try:
        res = runner.invoke(app, ["generate", str(wav(tmp_path / "c.wav")), "-i", "bass", "--out", str(ro / "o.wav"),
                                  "--model", str(model), *FAST])
        one_line_error(res, "not writable")
    finally:
        ro.chmod(stat.S_IRWXU)


def test_output_set_is_all_or_nothing(tmp_path, monkeypatch):
    """A failure while writing the second file of a set leaves none of them."""
    import soundfile

    from stemgen.engine.audio import write_audio_set

    real = soundfile.write
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(soundfile, "write", flaky)
    x = np.zeros((1, 100), np.float32)
    with pytest.raises(StemGenError, match="No space left on device"):
        write_audio_set([(tmp_path / "a.wav", x, 8000), (tmp_path / "b.wav", x, 8000)])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("opt, needle", [(["--temperature", "nan"], "temperature"), (["--variations", "0"], "variations"),
                                         (["--top-k", str(2 ** 40)], "top_k")])
def test_bad_options_one_line(model, tmp_path, opt, needle):
    res = runner.invoke(app, ["generate", str(wav(tmp_path / "c.wav")), "-i", "bass", "--out", str(tmp_path / "o.wav"),
                              "--model", str(model), *FAST, *opt])
    one_line_error(res, needle)


# --- the service ---------------------------------------------------------------------------------

def ctx_codes(engine, T, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, engine.config.lm.codebook_size, (1, engine.config.lm.n_q, T), generator=g)


def test_service_isolates_bad_requests_and_callbacks(model):
    engine = Engine.from_pretrained(model, device="cpu", dtype="float32")
    steps = (2, 1, 1, 1)
    solo = {i: engine.generate_tokens(ctx_codes(engine, 10 + i, i), "bass", steps=steps, seed=i) for i in range(32)}

    def slow(level, step, n):
        time.sleep(0.2)

    def raiser(kind):
        def cb(level, step, n):
            raise kind("from a callback")
        return cb

    special = {3: dict(top_k=2 ** 64), 5: dict(seed=1.5), 7: dict(progress=raiser(SystemExit)),
               9: dict(progress=raiser(KeyboardInterrupt)), 11: dict(progress=raiser(ValueError)),
               13: dict(progress=slow)}
    handles = {}

    def client(ids):
        for i in ids:
            kw = {"steps": steps, "seed": i, **special.get(i, {})}
            handles[i] = engine.submit(ctx_codes(engine, 10 + i, i), "bass", **kw)

    threads = [threading.Thread(target=client, args=(range(k, 32, 4),)) for k in range(4)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, h in handles.items():
        if i in (3, 5, 7, 9, 11):
            with pytest.raises(StemGenError):
                h.result(timeout=120)
        else:
            assert torch.equal(h.result(timeout=120), solo[i]), i
    # the slow callback (5 calls x 0.2 s) ran beside the scheduler, not inside it
    assert handles[13].done()
    engine.close()
    assert time.perf_counter() - t0 < 60


def test_service_lifecycle(model):
    engine = Engine.from_pretrained(model, device="cpu", dtype="float32")
    with engine:
        h = engine.submit(ctx_codes(engine, 50, 0), "bass", steps=(50, 50, 50, 50))
    assert h.done()  # draining close waited for it
    h1 = engine.submit(ctx_codes(engine, 50, 1), "bass", steps=(400, 400, 400, 400))
    engine.close(cancel=True)
    with pytest.raises(Exception) as e:
        h1.result(timeout=10)
    assert type(e.value).__name__ == "CancelledError"
    service = engine.service
    service.close()
    late = service.submit.__self__.failed(RuntimeError("x"))  # noqa: F841 (handle type check below)
    from stemgen.engine.request import Request
    req = Request(engine.config.lm, ctx_codes(engine, 5, 0), torch.tensor([0]), engine.sampling(steps=(1, 1, 1, 1)))
    with pytest.raises(StemGenError, match="closed"):
        service.submit(req).result(timeout=1)


def test_generate_tokens_raises_the_callback_error(model):
    engine = Engine.from_pretrained(model, device="cpu", dtype="float32")

    def boom(level, step, n):
        raise RuntimeError("stop")

    with pytest.raises(StemGenError, match="callback raised RuntimeError: stop"):
        engine.generate_tokens(ctx_codes(engine, 8, 0), "bass", steps=(2, 1, 1, 1), progress=boom)
    with pytest.raises(StemGenError, match="integer codes"):
        engine.generate_tokens(ctx_codes(engine, 8, 0).float(), "bass", steps=(2, 1, 1, 1))


def test_interpreter_exit_with_requests_in_flight(model, tmp_path):
    script = tmp_path / "exit.py"
    script.write_text(
        "import torch\n"
        "from stemgen.engine import Engine\n"
        f"e = Engine.from_pretrained({str(model)!r}, device='cpu', dtype='float32')\n"
        "hs = [e.submit(torch.zeros(1, 4, 200, dtype=torch.long), 'bass', steps=(500, 500, 500, 500), seed=i)"
        " for i in range(4)]\n"
        "print('submitted', flush=True)\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "submitted" in r.stdout and "terminate called" not in r.stderr


def test_info_rejects_what_generate_rejects_and_convert_uses_umask(model, tmp_path):
    bad = edit_config(model, tmp_path, _set(["lm", "d_model"], 33))
    one_line_error(runner.invoke(app, ["info", str(bad)]))
    cfg = StemGenConfig(d_model=32, n_heads=2, n_layers=1, codebook_size=16, ffn_multiple_of=16)
    save_checkpoint(random_train_model(cfg), tmp_path / "a.pt")
    old = os.umask(0o022)
    try:
        assert runner.invoke(app, ["convert", "--lm", str(tmp_path / "a.pt"), "--out", str(tmp_path / "o")]).exit_code == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "o").iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_idle_service_returns_freed_memory(model, monkeypatch):
    """After a burst, the idle worker hands glibc's cached free heap back (malloc_trim): resident
    memory stays bounded instead of at the burst's high-water mark."""
    import stemgen.engine.service as service

    calls = []
    monkeypatch.setattr(service, "release_free_memory", lambda: calls.append(1))
    engine = Engine.from_pretrained(model, device="cpu", dtype="float32")
    hs = [engine.submit(ctx_codes(engine, 20 + i, i), "bass", steps=(2, 1, 1, 1)) for i in range(6)]
    [h.result(timeout=60) for h in hs]
    t0 = time.time()
    while not calls and time.time() - t0 < 10:
        time.sleep(0.01)
    engine.close()
    assert calls, "the idle worker did not release memory"


# --- round 3: the trainer, disk errors, symlinks, names -------------------------------------------

TRAIN_BAD_OPTIONS = [
    (["--n-layers", "100000"], "--n-layers: 100000 is out of range"),
    (["--d-model", "100000000"], "--d-model"),
    (["--n-heads", "0"], "--n-heads: 0 is out of range"),
    (["--n-heads", "3"], "divisible by n_heads"),
    (["--d-model", "16384", "--n-layers", "256"], "GiB to train"),
    (["--frames", "0"], "--frames: 0 is out of range"),
    (["--frames", "1048576", "--batch-size", "65536"], "GiB to train"),
    (["--batch-size", "0"], "--batch-size: 0 is out of range"),
    (["--lr", "nan"], "--lr: must be finite"),
    (["--lr", "0"], "--lr: 0"),
    (["--decay-every", "0"], "--decay-every"),
    (["--decay-rate", "inf"], "--decay-rate"),
    (["--val-songs", "0"], "--val-songs"),
    (["--val-every", "0"], "--val-every"),
    (["--warmup", "-1"], "--warmup"),
    (["--seed", "-1"], "--seed"),
    (["--preset", "huge"], "--preset 'huge'"),
    (["--threads", "100000"], "--threads"),
]


@pytest.mark.parametrize("opts, needle", TRAIN_BAD_OPTIONS)
def test_train_options_checked_before_anything_is_read_or_allocated(tmp_path, monkeypatch, opts, needle):
    import stemgen.weights_convert.codec as wc
    monkeypatch.setattr(wc, "load_codec_any", lambda *a, **k: pytest.fail("read the codec before checking options"))
    res = runner.invoke(app, ["train", str(tmp_path / "corpus"), "--codec", str(tmp_path / "codec"), "--out",
                              str(tmp_path / "run"), *opts])
    one_line_error(res, needle)
    assert not (tmp_path / "run").exists()


CODEC_BAD_OPTIONS = [
    (["--n-filters", "100000"], "--n-filters: 100000 is out of range"),
    (["--n-filters", "1000"], "bottleneck"),
    (["--dimension", "100000"], "--dimension"),
    (["--bins", "1"], "--bins"),
    (["--n-q", "1000"], "--n-q"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "65536", "--n-filters", "512"], "GiB to train"),
    (["--lr", "inf"], "--lr"),
    (["--l1-weight", "inf"], "--l1-weight"),
    (["--fft-sizes", "65536"], "--fft-sizes: 65536 is too long"),
    (["--fft-sizes", "0"], "--fft-sizes"),
    (["--songs", "-1"], "--songs"),
    (["--stop-at", "0"], "--stop-at"),
]


@pytest.mark.parametrize("opts, needle", CODEC_BAD_OPTIONS)
def test_train_codec_options_checked_before_anything_is_allocated(tmp_path, monkeypatch, opts, needle):
    pytest.importorskip("auraloss")
    import stemgen.train.codec as tc
    monkeypatch.setattr(tc, "build_codec", lambda *a, **k: pytest.fail("built the codec before checking options"))
    res = runner.invoke(app, ["train-codec", str(tmp_path / "corpus"), "--out", str(tmp_path / "run"), *opts])
    one_line_error(res, needle)
    assert not (tmp_path / "run").exists()


def test_trainer_api_checks_options_first(tmp_path, monkeypatch):
    """The library entry points check too (torchrun scripts, recipes), before the cache is read."""
    import stemgen.train.trainer as tr
    from stemgen.train.loop import TrainError

    monkeypatch.setattr(tr, "TokenCorpus", lambda *a, **k: pytest.fail("read the cache before checking options"))
    for kw, needle in ((dict(model={"n_layers": 100000}), "--n-layers"), (dict(frames=0), "--frames"),
                       (dict(batch_size=0), "--batch-size"), (dict(lr=float("nan")), "--lr"),
                       (dict(model={"vocab": 3}), "model overrides")):
        with pytest.raises(TrainError, match=needle):
            tr.train_lm(tmp_path / "cache", tmp_path / "run", tr.TrainConfig(preset="tiny", **kw), log=lambda m: None)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def toy_track(tmp_path_factory):
    from stemgen.evaluation.corpus import make_corpus
    return make_corpus(tmp_path_factory.mktemp("toy") / "toy", songs=1, seed=3, sr=16000) / "Track00001"


def hostile_track(toy_track, tmp_path, meta=None, edit=None):
    """A copy of a toy-band track in a corpus of its own, its metadata.yaml replaced (text) or edited."""
    import yaml
    track = tmp_path / "corpus" / toy_track.name
    shutil.copytree(toy_track, track)
    if edit is not None:
        doc = yaml.safe_load((track / "metadata.yaml").read_text())
        meta = edit(doc)
        meta = meta if isinstance(meta, str) else yaml.safe_dump(meta)
    if meta is not None:
        (track / "metadata.yaml").write_text(meta)
    return track


def _stems(edit):
    def f(doc):
        edit(doc["stems"])
        return doc
    return f


CORPUS_CASES = [
    (dict(meta="stems: [S00, S01]\n"), "'stems' must be a non-empty mapping"),
    (dict(meta="stems: 5\n"), "'stems' must be a non-empty mapping"),
    (dict(meta="- 1\n- 2\n"), "must be a YAML mapping"),
    (dict(meta="stems: {S00: {inst_class: !!binary aGVsbG8=}}\n"), "inst_class b'hello'"),
    (dict(edit=_stems(lambda s: s["S01"].update(inst_class=5))), "inst_class 5"),
    (dict(edit=_stems(lambda s: s["S01"].update(inst_class="Bass\x1b[2J"))), "printable"),
    (dict(edit=_stems(lambda s: s["S01"].update(audio_rendered="yes"))), "audio_rendered"),
    (dict(edit=_stems(lambda s: s.update({"../../S00": s.pop("S00")}))), "plain name"),
    (dict(edit=_stems(lambda s: s.update({"S00": [1, 2]}))), "stems.S00 must be a mapping"),
    (dict(edit=lambda d: {**d, "audio_dir": "../../.."}), "audio_dir"),
    (dict(edit=lambda d: {**d, "audio_dir": "/etc"}), "audio_dir"),
    (dict(meta="stems: {S00: {inst_class: x}}\n#" + " " * (5 << 20) + "\n"), "at most 4194304"),
    (dict(meta="stems: !!python/name:os.system\n"), "not a readable metadata.yaml"),
    (dict(meta="[" * 20000 + "]" * 20000), "not a readable metadata.yaml"),
    (dict(meta="stems: {S00: {inst_class: x, audio_rendered: 1" + "0" * 5000 + "}}\n"), "not a readable"),
]


@pytest.mark.parametrize("how, needle", CORPUS_CASES)
def test_hostile_corpus_metadata_is_one_line(toy_track, tmp_path, how, needle):
    from stemgen.train.data import read_track
    from stemgen.train.loop import TrainError

    track = hostile_track(toy_track, tmp_path, **how)
    with pytest.raises(TrainError, match=re_escape(needle)) as e:
        read_track(track, 32000)
    assert "\n" not in str(e.value)


def re_escape(s):
    import re
    return re.escape(s)


def test_hostile_corpus_audio_gets_the_audio_limits(toy_track, tmp_path):
    """Stems go through generate's header limits: a 1 Hz stem would expand 32000x when resampled."""
    from stemgen.train.data import read_track, tokenize_corpus
    from stemgen.train.loop import TrainError

    track = hostile_track(toy_track, tmp_path)
    sf.write(track / "stems" / "S01.wav", np.zeros(100), 1)
    with pytest.raises(TrainError, match="sample rate 1 Hz"):
        read_track(track, 32000)
    sf.write(track / "stems" / "S01.wav", np.full(1000, np.nan), 16000, subtype="FLOAT")
    with pytest.raises(TrainError, match="NaN"):
        read_track(track, 32000)
    sf.write(track / "stems" / "S01.wav", np.zeros((0, 1)), 16000)
    with pytest.raises(TrainError, match="empty"):
        read_track(track, 32000)
    # a track shorter than one codec frame: one line, not an empty crop later in the sampler
    for sid in ("S00", "S01", "S02", "S03"):
        sf.write(track / "stems" / f"{sid}.wav", np.full(100, 0.1), 16000)
    from stemgen.engine.codec import Codec, CodecConfig
    from stemgen.random_model import random_codec_weights
    cfg = CodecConfig(n_filters=4, dimension=16, bins=32, lstm_layers=1)
    with pytest.raises(TrainError, match="shorter than one codec frame"):
        tokenize_corpus(track.parent, Codec(cfg, random_codec_weights(cfg, 0)), "k", tmp_path / "tok",
                        log=lambda m: None)


def test_hostile_corpus_through_the_cli(toy_track, model, tmp_path):
    track = hostile_track(toy_track, tmp_path, meta="stems: [S00]\n")
    res = runner.invoke(app, ["train", str(track.parent), "--codec", str(model), "--out", str(tmp_path / "run"),
                              "--preset", "tiny", "--val-songs", "1"])
    one_line_error(res, "metadata.yaml", "'stems' must be")


TAGGED = "seanet: {n_filters: 4, dimension: 16, ratios: [8, 5, 4, 4], lstm: 1}\nrvq: {n_q: 4, bins: 32}\n"


@pytest.mark.parametrize("xp, needle", [
    ("sample_rate: !!binary aGVsbG8=\n" + TAGGED, "sample_rate: must be an integer, got b'hello'"),
    ("sample_rate: 32000\nseanet: {n_filters: !!timestamp 2001-12-14, ratios: [8, 5, 4, 4]}\nrvq: {n_q: 4}\n",
     "n_filters: must be an integer, got datetime.date(2001, 12, 14)"),
    ("sample_rate: 32000\nseanet: {n_filters: 4, causal: !!set {a}}\nrvq: {n_q: 4}\n", "causal: must be true or false"),
    ("sample_rate: 1" + "0" * 5000 + "\n" + TAGGED, "not valid YAML"),
])
def test_yaml_tags_in_a_codec_xp_cfg(tmp_path, xp, needle):
    """YAML tags give values JSON has no words for (bytes, dates, sets): the schema's error names
    them instead of failing to format them."""
    from stemgen.weights_convert.codec import convert_codec

    src = tmp_path / "compression_state_dict.bin"
    torch.save({"best_state": {}, "xp.cfg": xp}, src)
    with pytest.raises(StemGenError, match=re_escape(needle)):
        convert_codec(src)


def alias_bomb(levels: int) -> str:
    """YAML whose value ``v`` expands to 10^levels items from a few hundred bytes (shared references)."""
    return ("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, levels)))


def test_yaml_alias_bomb_is_named_without_being_expanded(tmp_path, monkeypatch):
    """An alias bomb where a number belongs (a codec's xp.cfg sample_rate): one error line that shows
    the value's start; the error's text is built piece by piece, never by dumping the whole value."""
    import json
    from stemgen.engine import schema
    from stemgen.weights_convert.codec import convert_codec

    real = json.dumps

    def scalar_only(x, *a, **k):
        assert not isinstance(x, (list, dict)), "a whole container was serialised"
        return real(x, *a, **k)
    monkeypatch.setattr(schema.json, "dumps", scalar_only)
    src = tmp_path / "compression_state_dict.bin"
    torch.save({"best_state": {}, "xp.cfg": alias_bomb(7) + "sample_rate: *a6\n" + TAGGED}, src)
    with pytest.raises(StemGenError, match=re_escape('sample_rate: must be an integer, got [[[[[[["x", "x"')):
        convert_codec(src)


@pytest.mark.parametrize("edit, needle", [
    (lambda r: r["conditioners"]["description"]["t5"].update(name=b"hi"), "t5.name b'hi'"),
    (lambda r: r.update(masking=[1, 2]), "'span_len' is a list"),
    (lambda r: r["transformer_lm"].update(num_layers=b"x"), "transformer_lm.num_layers: must be an integer"),
])
def test_yaml_tags_in_a_magnet_xp_cfg(edit, needle):
    from stemgen.weights_convert.magnet import magnet_config

    root = {"transformer_lm": {"dim": 32, "num_heads": 2, "num_layers": 1, "n_q": 4, "card": 32},
            "conditioners": {"description": {"model": "t5", "t5": {"name": "t5-base"}}}}
    magnet_config(root, "ck")              # the document is valid as written
    edit(root)
    with pytest.raises(StemGenError, match=re_escape(needle)):
        magnet_config(root, "ck")


def test_weight_files_may_not_lead_outside_the_model_directory(model, tmp_path):
    """A weight file that is a symlink to anywhere (another model's file, /etc/passwd) is refused by
    generate, info and the trainer's codec reader before it is opened; links inside the folder work."""
    inside = tmp_path / "inside"
    shutil.copytree(model, inside)
    (inside / "sub").mkdir()
    (inside / "lm.safetensors").rename(inside / "sub" / "real.safetensors")
    (inside / "lm.safetensors").symlink_to(Path("sub") / "real.safetensors")
    Engine.from_pretrained(inside, device="cpu", dtype="float32")            # a link inside: fine
    for name, target in (("lm.safetensors", model / "lm.safetensors"), ("codec.safetensors", Path("/etc/passwd"))):
        bad = tmp_path / f"bad_{name.split('.')[0]}"
        shutil.copytree(model, bad)
        (bad / name).unlink()
        (bad / name).symlink_to(target)
        with pytest.raises(StemGenError, match="outside the model directory"):
            Engine.from_pretrained(bad, device="cpu", dtype="float32")
        one_line_error(runner.invoke(app, ["info", str(bad)]), "outside the model directory")
    from stemgen.weights_convert.codec import load_codec_any
    with pytest.raises(StemGenError, match="outside the model directory"):
        load_codec_any(bad)


def test_text_encoder_folder_may_not_lead_outside(tmp_path):
    from stemgen.engine.config import inside_model_dir

    d = tmp_path / "m"
    (d / "text_encoder").mkdir(parents=True)
    (d / "text_encoder" / "config.json").write_text("{}")
    assert inside_model_dir(d, "text_encoder", recursive=True) == (d / "text_encoder").resolve()
    (d / "text_encoder" / "spiece.model").symlink_to("/etc/passwd")
    with pytest.raises(StemGenError, match="spiece.model: a link that leads outside"):
        inside_model_dir(d, "text_encoder", recursive=True)
    (d / "t5").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(StemGenError, match="outside the model directory"):
        inside_model_dir(d, "t5", recursive=True)


@pytest.mark.parametrize("key, value, needle", [
    ("num_layers", 200000, "config.json.num_layers: 200000 is out of range [1, 96]"),
    ("num_layers", 3, "config.json says 3 encoder layers, the weights hold 2"),
    ("d_model", "32", "d_model"),
    ("vocab_size", 10 ** 12, "config.json.vocab_size: 1000000000000 is out of range [1, 1048576]"),
    ("model_type", "umt5", "model_type 'umt5' is not a T5 encoder"),   # per-layer position bias T5 lacks
    ("d_ff", 131072, "describes a T5 encoder of 16.8M parameters, its weights hold 0.0M values"),  # within bounds
])
def test_t5_config_is_checked_against_bounds_and_its_weights(tmp_path, key, value, needle):
    """A T5 folder's config.json is untrusted: transformers builds (and randomly initialises) every
    layer it names, so 200,000 layers over a 2-layer file used to allocate gigabytes; refused first."""
    import json
    from stemgen.engine.text import read_t5_folder

    folder = tmp_path / "t5"
    shutil.copytree(Path(__file__).parent / "fixtures" / "magnet" / "t5-tiny", folder)
    read_t5_folder(folder)                     # as written: loads
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(StemGenError, match=re_escape(needle)):
        read_t5_folder(folder)


@pytest.mark.parametrize("content, needle", [
    ("/dev/zero", "a list of files larger than 4 MB"),
    (b"\xff\xfe\xf9 not text", "not a UTF-8 text list of audio files"),
    (None, "cannot be read (No such file or directory)"),
])
def test_a_list_of_inputs_is_read_bounded(model, tmp_path, content, needle):
    """`stemgen generate LIST.txt`: a list that is a device (no size to check first) stops at 4 MB, a
    binary one or a missing one is one line naming it (they read without bound, or printed only errno)."""
    lst = tmp_path / "list.txt"
    if content == "/dev/zero":
        lst.symlink_to("/dev/zero")
    elif content is not None:
        lst.write_bytes(content)
    res = runner.invoke(app, ["generate", str(lst), "-i", "bass", "--out", str(tmp_path / "out"), "--model", str(model)])
    one_line_error(res, str(lst), needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, needle", [
    ("[" * 100000 + "]" * 100000, "nested too deeply"), ("\xff", "not valid JSON"), ("[1]", "not a JSON object"),
    ("/dev/zero", "too large for a config file"),
])
def test_hf_codec_config_is_one_line(tmp_path, text, needle):
    """An HF Encodec folder's config.json goes through the bounded JSON reader (it was read whole and a
    deep nesting ended in a RecursionError traceback)."""
    from stemgen.weights_convert.codec import read_hf
    folder = tmp_path / "hf"
    folder.mkdir()
    if text == "/dev/zero":
        (folder / "config.json").symlink_to("/dev/zero")
    else:
        (folder / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(StemGenError, match=re_escape(needle)):
        read_hf(folder, None)


def test_t5_weights_are_counted_from_the_files_transformers_loads(tmp_path):
    """The values a T5 config may describe are counted from the safetensors headers of what transformers
    loads (model.safetensors, or the shards its index names): a sparse or unrelated large file beside
    them counts for nothing; a folder without safetensors weights is refused."""
    import json
    import os
    from stemgen.engine.text import read_t5_folder

    folder = tmp_path / "t5"
    shutil.copytree(Path(__file__).parent / "fixtures" / "magnet" / "t5-tiny", folder)
    with open(folder / "training_args.bin", "wb") as f:      # 1 GB apparent size, nothing on disk
        f.truncate(1 << 30)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "d_model": 4096, "d_ff": 65536}))
    with pytest.raises(StemGenError, match="describes a T5 encoder of"):
        read_t5_folder(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    os.rename(folder / "model.safetensors", folder / "model-00001-of-00001.safetensors")
    with pytest.raises(StemGenError, match="safetensors only"):
        read_t5_folder(folder)
    from safetensors import safe_open
    with safe_open(str(folder / "model-00001-of-00001.safetensors"), framework="pt") as f:
        names = list(f.keys())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}))
    read_t5_folder(folder)                     # sharded, as transformers reads it: loads


CONTROL_NAMES = ["bass", "dr\x1b[31mums\nFAKE: line", "\u202egnp.exe"]


def test_control_characters_in_names_are_escaped(model, tmp_path):
    """Instrument and file names from files are printed with their control characters escaped: no
    terminal escape sequence, newline or bidi override reaches the terminal raw, one error line stays one."""
    bad = edit_config(model, tmp_path, _set(["instruments"], CONTROL_NAMES))
    res = runner.invoke(app, ["info", str(bad)])
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.stdout and "\u202e" not in res.stdout and "FAKE: line" in res.stdout
    assert "dr\\x1b[31mums\\nFAKE: line" in res.stdout and "\\u202egnp.exe" in res.stdout
    ctx = wav(tmp_path / "c.wav")
    res = runner.invoke(app, ["generate", str(ctx), "-i", "piano\x1b]0;pwned\x07", "--out", str(tmp_path / "o.wav"),
                              "--model", str(bad), *FAST])
    one_line_error(res, "piano\\x1b]0;pwned\\x07", "dr\\x1b[31mums\\nFAKE: line")
    assert "\x1b" not in res.stderr
    weird = tmp_path / "a\nb\x1b[2J.wav"
    res = runner.invoke(app, ["generate", str(weird), "-i", "bass", "--out", str(tmp_path / "o.wav"), "--model",
                              str(bad), *FAST])
    one_line_error(res, "a\\nb\\x1b[2J.wav")


def test_help_keeps_bracketed_words():
    """Rich markup ate '[serve]' from `serve --help` ("pip install -e '.'"); every bracketed word of
    every command's help and options' help is shown."""
    import re

    import typer

    cmd = typer.main.get_command(app)
    for name, sub in cmd.commands.items():
        texts = [sub.help or ""] + [p.help or "" for p in sub.params]
        words = {m.replace("\\[", "[") for t in texts for m in re.findall(r"\\?\[[a-z][^\[\]]*\]", t)}
        out = runner.invoke(app, [name, "--help"], env={"COLUMNS": "400"}).stdout
        for w in words:
            assert w in out, (name, w)
    assert "pip install -e '.[serve]'" in runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "400"}).stdout
    assert "'.[cluster]'" in runner.invoke(app, ["generate-dataset", "--help"], env={"COLUMNS": "400"}).stdout


CONVERT_UNDER_LIMIT = """
import json, resource, sys
from typer.testing import CliRunner
from stemgen.cli import app
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
res = [CliRunner().invoke(app, args) for args in json.loads(sys.argv[2])]
print(json.dumps([[r.exit_code, r.stdout, r.stderr, repr(r.exception)] for r in res]))
"""


def test_convert_on_a_full_disk(model, tmp_path):
    """convert under a file-size limit (as on a full disk): one error line, no output directory, no
    temporary left; with --force the model directory it would have replaced is kept intact."""
    cfg = StemGenConfig(d_model=64, n_heads=2, n_layers=2, codebook_size=32, ffn_multiple_of=16)
    save_checkpoint(random_train_model(cfg), tmp_path / "a.pt")
    existing = tmp_path / "existing"
    shutil.copytree(model, existing)
    before = snapshot(existing)
    script = tmp_path / "limit.py"
    script.write_text(CONVERT_UNDER_LIMIT)
    runs = [["convert", "--lm", str(tmp_path / "a.pt"), "--out", str(tmp_path / "new")],
            ["convert", "--lm", str(tmp_path / "a.pt"), "--out", str(existing), "--force"]]
    r = subprocess.run([sys.executable, str(script), "20000", json.dumps(runs)], capture_output=True, text=True,
                       timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    for code, out, err, exc in json.loads(r.stdout.strip().splitlines()[-1]):
        assert code == 1 and err.startswith("error:") and len(err.strip().splitlines()) == 1, (code, err, exc)
        assert "File too large" in err and "nothing was replaced" in err, err
    assert not (tmp_path / "new").exists() and snapshot(existing) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "existing", "limit.py"]
