"""`stemgen convert` / `stemgen info` and bad input: one clear line, nonzero exit, nothing left behind."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from stemgen import cpp_ext
from stemgen.cli import app
from stemgen.engine import Engine, ModelFormatError
from stemgen.train import StemGenConfig, save_checkpoint

from helpers import random_train_model

CFG = StemGenConfig(d_model=32, n_heads=2, n_layers=2, codebook_size=24, ffn_multiple_of=16)
runner = CliRunner()


@pytest.fixture()
def ckpt(tmp_path):
    path = tmp_path / "lm.pt"
    save_checkpoint(random_train_model(CFG), path)
    return path


def convert(tmp_path, src, *extra):
    out = tmp_path / "out_model"
    res = runner.invoke(app, ["convert", "--lm", str(src), "--out", str(out), *extra])
    return res, out


def assert_clean_failure(res, out, *needles):
    assert res.exit_code != 0, res.output
    err = res.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)
    assert "Traceback" not in res.output
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "temp dir left"


def test_convert_then_info_and_load(tmp_path, ckpt):
    res, out = convert(tmp_path, ckpt)
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "stemgen-engine" and cfg["lm"]["n_layers"] == 2
    res = runner.invoke(app, ["info", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    n_train = sum(p.numel() for p in random_train_model(CFG).parameters())
    assert info["lm_parameters"] == n_train
    assert info["stored_dtype"] == "F32"
    assert "attention" in info["backends"]
    eng = Engine.from_pretrained(out, device="cpu")
    assert eng.instruments == CFG.instruments
    # refuses to overwrite without --force, replaces with it
    res2, _ = convert(tmp_path, ckpt)
    assert res2.exit_code != 0 and "already exists" in res2.stderr
    res3, _ = convert(tmp_path, ckpt, "--force", "--dtype", "bfloat16")
    assert res3.exit_code == 0
    assert json.loads(runner.invoke(app, ["info", str(out), "--json"]).stdout)["stored_dtype"] == "BF16"


def test_force_replaces_only_a_model_folder(tmp_path, ckpt):
    """--force replaces an engine model folder (or an empty one), never a file or another folder, and
    never touches a '.NAME.old' beside it (a fixed name it once used for the folder it replaced)."""
    out = tmp_path / "out_model"
    side = tmp_path / ".out_model.old"
    side.mkdir()
    (side / "notes.txt").write_text("precious")
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    res, _ = convert(tmp_path, ckpt, "--force")
    assert res.exit_code == 1 and "is not an engine model folder" in res.stderr, res.output
    assert (out / "mine.txt").read_text() == "mine"
    (out / "mine.txt").unlink()
    assert convert(tmp_path, ckpt, "--force")[0].exit_code == 0            # an empty folder
    res, _ = convert(tmp_path, ckpt, "--force", "--dtype", "bfloat16")      # a model folder
    assert res.exit_code == 0 and (out / "config.json").is_file()
    assert (side / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out_model.old", "lm.pt", "out_model"]
    wav = tmp_path / "song.wav"
    wav.write_bytes(b"RIFF")
    res = runner.invoke(app, ["convert", "--lm", str(ckpt), "--out", str(wav), "--force"])
    assert res.exit_code == 1 and "is not an engine model folder" in res.stderr and wav.read_bytes() == b"RIFF"


@pytest.mark.parametrize("extra, needle", [
    (["--sampling", "guidance=magnet"], "guidance 'magnet' is MAGNeT's; a StemGen model takes multi"),
    (["--dtype", "int8"], "int8 is quantized when a model loads"),
    (["--dtype", "int9"], "unknown dtype 'int9'"),
])
def test_convert_stores_float_dtypes_only(tmp_path, ckpt, extra, needle):
    res, out = convert(tmp_path, ckpt, *extra)
    assert_clean_failure(res, out, needle)


def test_convert_out_must_name_a_folder(tmp_path, ckpt, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["convert", "--lm", str(ckpt), "--out", ".", "--force"])
    assert res.exit_code == 1 and "names no new folder" in res.stderr, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm.pt"]


class _Runs:
    """Unpickling this would run a shell command (a hostile checkpoint)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("obj, named", [(lambda m: {"x": _Runs(m)}, "posix.system"),
                                         (lambda m: torch.nn.Linear(2, 2), "torch.nn.modules.linear.Linear")])
def test_a_checkpoint_holding_objects_is_refused_in_one_line(tmp_path, recwarn, obj, named):
    """weights_only loading refuses a pickle that names a function or class (one that would run code, or
    a whole saved model): the line names it and asks for a state_dict, without torch's advice to load
    it unsafely; a file that is no pickle at all keeps the corrupt-or-other-format line."""
    marker = tmp_path / "PWNED"
    bad = tmp_path / "evil.pt"
    torch.save(obj(marker), bad)
    res, out = convert(tmp_path, bad)
    assert_clean_failure(res, out, "holds objects other than tensors", named, "never runs code from a checkpoint")
    assert "weights_only" not in res.output and "False" not in res.output and not marker.exists()
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]
    bad.write_bytes(b"\x80\x02" + bytes(range(200)))
    res, out = convert(tmp_path, bad, "--lm-format", "train")
    assert_clean_failure(res, out, "cannot be read as a PyTorch checkpoint")
    assert "weights_only" not in res.output


def _edit_ckpt(ckpt, fn):
    ck = torch.load(ckpt, weights_only=True)
    fn(ck)
    torch.save(ck, ckpt)


def test_convert_sets_the_models_sampling_defaults(tmp_path, ckpt):
    """--sampling stores the model's own defaults (the engine and `stemgen info` use them; a request's
    own options still win); a bad key or value is one line and no directory."""
    res, out = convert(tmp_path, ckpt, "--sampling", "cfg_context=1.5, cfg_instrument=1.5,steps=8/4/2/2,guidance=single")
    assert res.exit_code == 0, res.output
    eng = Engine.from_pretrained(out, device="cpu")
    s = eng.config.sampling
    assert (s.cfg_context, s.cfg_instrument, s.steps, s.guidance, s.w_causal) == (1.5, 1.5, (8, 4, 2, 2), "single", 0.1)
    assert eng.sampling(cfg_context=3.0).cfg_context == 3.0
    info = runner.invoke(app, ["info", str(out)])
    assert "cfg_context=1.5" in info.stdout, info.stdout
    for bad, needle in (("cfg_contxt=1", "cfg_contxt"), ("cfg_context=high", "cfg_context"),
                        ("steps=8/x", "steps"), ("temperature=-1", "temperature"), ("top_k", "top_k")):
        target = tmp_path / f"bad_{len(bad)}_{needle}"
        res = runner.invoke(app, ["convert", "--lm", str(ckpt), "--out", str(target), "--sampling", bad])
        assert_clean_failure(res, target, needle)


def test_missing_tensor(tmp_path, ckpt):
    _edit_ckpt(ckpt, lambda ck: ck["model"].pop("layers.1.ffn.w2.weight"))
    assert_clean_failure(*convert(tmp_path, ckpt), "layers.1.ffn.w2.weight", "missing")


def test_wrong_shape(tmp_path, ckpt):
    _edit_ckpt(ckpt, lambda ck: ck["model"].__setitem__("heads.0.weight", torch.zeros(24, 31)))
    assert_clean_failure(*convert(tmp_path, ckpt), "heads.0.weight", "[24, 31]")


def test_mismatched_config(tmp_path, ckpt):
    _edit_ckpt(ckpt, lambda ck: ck["config"].__setitem__("n_layers", 3))
    assert_clean_failure(*convert(tmp_path, ckpt), "layers.2.")
    _edit_ckpt(ckpt, lambda ck: ck["config"].update(n_layers=2, d_model=64, n_heads=4))
    assert_clean_failure(*convert(tmp_path, ckpt), "do not match")
    _edit_ckpt(ckpt, lambda ck: ck["config"].update(d_model=32, n_heads=2, colour="blue"))
    assert_clean_failure(*convert(tmp_path, ckpt), "colour")


def test_unknown_format(tmp_path):
    txt = tmp_path / "notes.pt"
    txt.write_text("hello, not a checkpoint\n")
    assert_clean_failure(*convert(tmp_path, txt), "unknown LM checkpoint format")
    lst = tmp_path / "list.pt"
    torch.save([1, 2, 3], lst)
    assert_clean_failure(*convert(tmp_path, lst), "unknown LM checkpoint format")
    assert_clean_failure(*convert(tmp_path, tmp_path / "nope.pt"), "no such file")
    res, out = convert(tmp_path, lst, "--lm-format", "audiocraft")
    assert_clean_failure(res, out, "--lm-format")


def test_corrupt_file(tmp_path, ckpt):
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    assert_clean_failure(*convert(tmp_path, ckpt), "cannot be read")


def test_output_parent_missing(tmp_path, ckpt):
    out = tmp_path / "no" / "such" / "dir"
    res = runner.invoke(app, ["convert", "--lm", str(ckpt), "--out", str(out)])
    assert res.exit_code != 0 and "does not exist" in res.stderr


def test_engine_rejects_bad_model_dir(tmp_path, ckpt):
    res, out = convert(tmp_path, ckpt)
    assert res.exit_code == 0
    w = load_file(out / "lm.safetensors")
    w.pop("layers.0.wqkv")
    save_file(w, out / "lm.safetensors")
    with pytest.raises(ModelFormatError, match="layers.0.wqkv"):
        Engine.from_pretrained(out, device="cpu")
    w["layers.0.wqkv"] = torch.zeros(5, 5)
    save_file(w, out / "lm.safetensors")
    with pytest.raises(ModelFormatError, match=r"layers.0.wqkv.*shape \[5, 5\]"):
        Engine.from_pretrained(out, device="cpu")
    (out / "lm.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelFormatError, match="safetensors"):
        Engine.from_pretrained(out, device="cpu")
    cfg = json.loads((out / "config.json").read_text())
    cfg["lm"]["n_heads"] = 3
    (out / "config.json").write_text(json.dumps(cfg))
    res = runner.invoke(app, ["info", str(out)])
    assert res.exit_code != 0 and "divisible by n_heads" in res.stderr
    res = runner.invoke(app, ["info", str(tmp_path / "missing")])
    assert res.exit_code != 0 and "not a directory" in res.stderr


def test_console_script_help_and_info(tmp_path, ckpt):
    """The installed `stemgen` entry point itself (as a user runs it)."""
    exe = Path(sys.executable).with_name("stemgen")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "stemgen"]
    out = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "convert" in out.stdout and "info" in out.stdout
    model = tmp_path / "m"
    out = subprocess.run(cmd + ["convert", "--lm", str(ckpt), "--out", str(model)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    out = subprocess.run(cmd + ["info", str(model)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0 and "parameters" in out.stdout, out.stderr


def test_info_without_model_reports_backends():
    res = runner.invoke(app, ["info", "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    be = json.loads(res.stdout)["backends"]
    assert be["device"] == "cpu" and "C++ extension" in be and "guidance+sampling" in be


def test_info_reports_the_backends_of_a_dtype():
    """--dtype: the ops that dtype would run (fp32 trunk GEMMs on oneDNN, the int8 path's are int8); bad ones
    one line."""
    from stemgen.kernels import OPS
    be = {d: json.loads(runner.invoke(app, ["info", "--json", "--device", "cpu", "--dtype", d]).stdout)["backends"]
          for d in ("float32", "int8")}
    assert be["int8"]["LM dtype (this report)"] == "int8"
    from stemgen.kernels.int8_linear import weight_code_max
    assert be["int8"]["int8 weight codes"] == weight_code_max()[1]   # 8 or 7 bits: what the int8 GEMM sums exactly
    gemm = OPS["linear"].title
    assert be["int8"][gemm].startswith(OPS["linear"].reference_label) and "int8_linear" in be["int8"][gemm]
    if cpp_ext.available():
        assert be["float32"][gemm] == OPS["linear"].variants["cpp"].label
        assert be["int8"]["RMSNorm"] == be["float32"]["RMSNorm"] == OPS["rms_norm"].variants["cpp"].label
    for args, msg in ((["--dtype", "int9"], "unknown dtype 'int9'"), (["--dtype", "int8", "--device", "cuda"], "")):
        res = runner.invoke(app, ["info", *args])
        assert res.exit_code != 0 and "Traceback" not in res.output and msg in res.output, res.output


def test_info_points_to_int8_where_the_cpu_has_no_amx(monkeypatch):
    """Without AMX the int8 GEMMs (VNNI or AVX2) beat the default dtype's: `stemgen info` says so beside
    the default, with its cost; with AMX (bf16 as fast) or in the int8 report itself it says nothing."""
    from stemgen.engine import api, model
    cpu = torch.device("cpu")
    for flags, hinted in (({"avx2", "avx512_vnni", "avx512_bf16"}, True), ({"avx2"}, True),
                          ({"avx2", "avx512_bf16", "amx_bf16", "amx_int8"}, False)):
        monkeypatch.setattr(model, "read_cpu_flags", lambda f=flags: frozenset(f))
        assert (api.INT8_HINT in api.backends(cpu)["LM dtype (default)"]) == hinted, flags
        assert api.INT8_HINT not in api.backends(cpu, "int8")["LM dtype (default)"]


def test_format_table_drives_detection_choices_and_help():
    """One table of formats: every row's detector and reader resolve, `convert --help` lists each,
    and an unknown --codec-format names the table's choices."""
    from stemgen.weights_convert.formats import FORMATS, get

    res = CliRunner().invoke(app, ["convert", "--help"], env={"COLUMNS": "300"})
    for f in FORMATS:
        assert callable(f.fn("detect")) and callable(f.fn("read"))
        assert f.name in res.output
    with pytest.raises(ModelFormatError, match="choose one of audiocraft, engine, hf, encodec"):
        get("codec", "wav")


def test_convert_unpickles_the_checkpoint_once(tmp_path, ckpt, monkeypatch):
    """Detection, conversion and the training window share one read of the user's pickle (a paper-size
    checkpoint is a GB: reading it three times cost seconds and memory)."""
    from stemgen.weights_convert import pickles

    reads = []
    real = pickles.read_pickle
    monkeypatch.setattr(pickles, "read_pickle", lambda path: reads.append(path) or real(path))
    res, out = convert(tmp_path, ckpt)
    assert res.exit_code == 0, res.output
    assert reads == [ckpt]


def test_codec_from_an_engine_model_directory(tmp_path, ckpt):
    """--codec DIR of an engine model: its codec reused with a new LM (the same tensors); a model
    directory without a codec is one line."""
    from helpers import tiny_model_dir
    src = tiny_model_dir(tmp_path)
    lm = tmp_path / "lm32.pt"
    n_codes = json.loads((src / "config.json").read_text())["lm"]["codebook_size"]
    save_checkpoint(random_train_model(StemGenConfig(d_model=32, n_heads=2, n_layers=2, codebook_size=n_codes,
                                                     ffn_multiple_of=16)), lm)
    res, out = convert(tmp_path, lm, "--codec", str(src))
    assert res.exit_code == 0, res.output
    want, got = load_file(str(src / "codec.safetensors")), load_file(str(out / "codec.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k].float(), got[k].float()) for k in want)
    assert Engine.from_pretrained(out, device="cpu").codec is not None
    (tmp_path / "b").mkdir()
    lm_only = tmp_path / "b" / "lm_only"
    assert runner.invoke(app, ["convert", "--lm", str(ckpt), "--out", str(lm_only)]).exit_code == 0
    (tmp_path / "c").mkdir()
    res, out = convert(tmp_path / "c", ckpt, "--codec", str(lm_only))
    assert_clean_failure(res, out, "has no codec")
