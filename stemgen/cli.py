"""The `stemgen` command line."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .cli_common import (_model_dir, _numbered, _say, check_seed_range, console, err_console, fail,  # noqa: F401
                         printable, run_guarded)
from .engine.fileutil import atomic_write_text
from .weights_convert.formats import describe as describe_formats
from .weights_convert.formats import formats

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="StemGen engine: generate a stem that fits a musical context.")


class _ConsoleWarnings(logging.Handler):
    def emit(self, record):
        _say("warning:", "yellow", record.getMessage())


def _route_warnings():
    """Engine warnings (logger 'stemgen') go to stderr as one line each."""
    logger = logging.getLogger("stemgen")
    if not any(isinstance(h, _ConsoleWarnings) for h in logger.handlers):
        logger.addHandler(_ConsoleWarnings(logging.WARNING))
        logger.propagate = False


@app.command()
def info(model_dir: Optional[Path] = typer.Argument(None, help="engine model directory (made by `stemgen convert`); "
                                                    "'demo' or 'random' for the built-in models; omit for backends only"),
         device: str = typer.Option("auto", help="device to report backends for: auto, cpu, cuda"),
         dtype: Optional[str] = typer.Option(None, help="dtype to report backends for (as generate's --dtype; "
                                                        "default: the device's)"),
         as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON")):
    """Show a model directory's config, size, dtype and the backends that would run it."""
    from .engine.api import backends, pick_device
    from .engine.config import ModelConfig
    from .engine.architectures import expected_shapes

    if model_dir is None:
        be = run_guarded(lambda: backends(pick_device(device), dtype))
        if as_json:
            print(json.dumps({"backends": be}, indent=2))
            return
        t = Table(title="stemgen backends", show_header=False)
        for k, v in be.items():
            t.add_row(printable(k), printable(v))
        console.print(t)
        return
    if model_dir is not None:
        model_dir = run_guarded(_model_dir, str(model_dir))

    def gather():
        from .engine import Engine
        cfg = ModelConfig.load(model_dir)
        Engine.from_pretrained(model_dir, device="cpu", dtype="float32")  # the same checks as generate
        n_params = sum(math.prod(s) for s in expected_shapes(cfg.lm).values())
        stored = _stored_dtype(cfg.file(model_dir, "lm"))
        return cfg, n_params, stored, backends(pick_device(device), dtype, arch=cfg.lm.arch)

    cfg, n_params, stored, be = run_guarded(gather)
    if as_json:
        print(json.dumps({"config": cfg.to_dict(), "lm_parameters": n_params, "stored_dtype": stored,
                          "backends": be}, indent=2))
        return
    from rich.text import Text
    t = Table(title=Text(printable(f"stemgen model: {model_dir}")), show_header=False)
    lm = cfg.lm
    rows = [("model kind", "MAGNeT (text-conditioned; generate --text)" if lm.arch == "magnet" else
             "StemGen (context + instrument; generate CONTEXT -i INSTRUMENT)"),
            ("LM", f"d_model {lm.d_model}, {lm.n_heads} heads, {lm.n_layers} layers, ffn {lm.ffn_hidden}")]
    if lm.arch == "magnet":
        rows += [("tokens", f"Q = {lm.n_q} levels x {lm.codebook_size} codes; segment {lm.segment_frames} frames; "
                            f"levels >= 1 attend +-{lm.band} frames; spans of {lm.span_len}"),
                 ("text encoder", f"{cfg.weights.get('text_encoder')}/ (T5, width {lm.text_dim})")]
    else:
        rows += [("tokens", f"Q = {lm.n_q} levels x {lm.codebook_size} codes, {lm.n_channels} channels "
                            f"(last = target)"),
                 ("conditions", f"{len(lm.cond_sizes)} source(s), sizes {list(lm.cond_sizes)}"),
                 ("instruments", ", ".join(cfg.instruments))]
    rows += [("parameters", f"{n_params / 1e6:.2f} M"),
             ("stored dtype", stored),
            ("codec", "none (add one with `stemgen convert --codec SRC`)" if not cfg.codec else
             json.dumps(cfg.codec)),
            ("sampling", ", ".join(f"{k}={v}" for k, v in cfg.sampling.knobs().items()))]
    rows += [(f"backend: {k}", v) for k, v in be.items()]
    for k, v in rows:
        t.add_row(Text(printable(k)), Text(printable(v)))  # names come from the file: never markup, no escapes
    console.print(t)


def _stored_dtype(path: Path) -> str:
    from safetensors import safe_open
    from .engine.config import ModelFormatError
    if not path.is_file():
        raise ModelFormatError(f"{path}: LM weight file missing; re-run `stemgen convert`")
    try:
        with safe_open(str(path), framework="pt") as f:
            return ",".join(sorted({f.get_slice(k).get_dtype() for k in f.keys()}))
    except Exception as e:
        raise ModelFormatError(f"{path}: not a readable safetensors file ({e})") from None


@app.command()
def convert(lm: Optional[Path] = typer.Option(None, "--lm", help=f"LM checkpoint: {describe_formats('lm')}"),
            out: Optional[Path] = typer.Option(None, "--out", help="output model directory (must not exist unless "
                                               "--force)"),
            from_hf_cache: Optional[str] = typer.Option(None, "--from-hf-cache", help="a MAGNeT repo id that "
                                                        "audiocraft already downloaded (e.g. facebook/magnet-small-"
                                                        "10secs): found offline in the Hugging Face cache with its "
                                                        "codec and T5, converted into stemgen's cache (or --out); "
                                                        "then --model REPO works"),
            codec: Optional[Path] = typer.Option(None, "--codec", help=f"codec: {describe_formats('codec')}"),
            lm_format: Optional[str] = typer.Option(None, "--lm-format", help="override format detection: "
                                                    + ", ".join(f.name for f in formats('lm'))),
            codec_format: Optional[str] = typer.Option(None, "--codec-format", help="override format detection: "
                                                       + ", ".join(f.name for f in formats('codec'))),
            text_encoder: Optional[Path] = typer.Option(None, "--text-encoder", help="MAGNeT: the local T5 folder "
                                                        "(t5-base for the music models), stored in the model directory"),
            dtype: str = typer.Option("float32", help="stored weight dtype: float32, bfloat16, float16"),
            sampling: Optional[str] = typer.Option(None, "--sampling", help="the model's default sampling settings, "
                                                   "KEY=VALUE,... over the paper's (e.g. cfg_context=1.5,"
                                                   "cfg_instrument=1.5; steps=128/64/32/32); StemGen models"),
            force: bool = typer.Option(False, "--force", help="replace an existing output directory")):
    """Convert checkpoints into one engine model directory (config.json + safetensors)."""
    from .engine.config import CODEC_WEIGHTS, LM_WEIGHTS, ModelConfig, ModelFormatError, SamplingConfig, parse_sampling
    from .engine.model import resolve_dtype
    from .weights_convert import convert_train_checkpoint, write_model_dir
    from .weights_convert.codec import convert_codec
    from .weights_convert.lm import training_window
    from .weights_convert.pickles import PickleFile

    import torch
    try:
        stored = resolve_dtype(dtype)
    except ValueError as e:
        fail(str(e))
    if stored not in (torch.float32, torch.bfloat16, torch.float16):
        fail(f"--dtype {dtype} is not a stored dtype (float32, bfloat16, float16): int8 is quantized when a model "
             "loads, to the codes this CPU's int8 GEMM sums exactly; convert in float32 and run with --dtype int8")
    if from_hf_cache is not None:
        if lm is not None or codec is not None or text_encoder is not None:
            fail("--from-hf-cache finds the LM, codec and text encoder itself; drop --lm/--codec/--text-encoder")
        from .weights_convert.hf_cache import convert_from_hf_cache
        path = run_guarded(lambda: convert_from_hf_cache(from_hf_cache, out, stored, force))
        console.print(f"wrote {path}; use it with --model {from_hf_cache}")
        return
    if lm is None or out is None:
        fail("give --lm CKPT and --out DIR (or --from-hf-cache REPO)")

    def work():
        from .weights_convert.formats import detect, get
        defaults = SamplingConfig(**parse_sampling(sampling)) if sampling is not None else SamplingConfig()
        source = PickleFile(lm)   # unpickled once: detection, conversion and the training window
        fmt = get("lm", lm_format) if lm_format else detect("lm", source)
        if fmt.name == "magnet":
            if sampling is not None:
                raise ValueError("--sampling is for StemGen models; a MAGNeT model takes its defaults from its checkpoint")
            from .weights_convert.magnet import convert_magnet
            return convert_magnet(source, out, codec, codec_format, text_encoder, stored, force)
        if text_encoder is not None:
            raise ModelFormatError("--text-encoder is for MAGNeT checkpoints; this LM is a StemGen model")
        lm_cfg, instruments, lm_state = convert_train_checkpoint(source, fmt.name, stored)
        weights, codec_cfg = {"lm": lm_state}, None
        if codec is not None:
            codec_cfg, weights["codec"] = convert_codec(codec, codec_format)
            if codec_cfg.bins != lm_cfg.codebook_size or codec_cfg.n_q < lm_cfg.n_q:
                raise ModelFormatError(f"codec ({codec_cfg.n_q} levels x {codec_cfg.bins} codes) does not fit the "
                                       f"LM ({lm_cfg.n_q} levels x {lm_cfg.codebook_size} codes)")
        config = ModelConfig(lm=lm_cfg, instruments=instruments, dtype=str(stored).split(".")[-1],
                             sampling=defaults,
                             codec=codec_cfg.to_dict() if codec_cfg else None,
                             weights={"lm": LM_WEIGHTS, "codec": CODEC_WEIGHTS if codec_cfg else None},
                             window=training_window(source))
        return write_model_dir(out, config, weights, overwrite=force)

    path = run_guarded(work)
    console.print(f"wrote {path}")


# named step presets for 4-level models (SPEC section 4): the paper's, MAGNeT's, SoundStorm-like
STEP_PRESETS = {"paper": (128, 64, 32, 32), "magnet": (20, 10, 10, 10), "soundstorm": (16, 1, 1, 1)}


def _csv(text: str) -> tuple[str, ...]:
    """'bass, drums, bass' -> ('bass', 'drums')."""
    return tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))


def _parse_steps(text: Optional[str]):
    if text is None:
        return None
    if text in STEP_PRESETS:
        return STEP_PRESETS[text]
    try:
        steps = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"--steps must be comma-separated integers such as 128,64,32,32 or a preset "
                         f"({', '.join(STEP_PRESETS)}), got {text!r}") from None
    return steps


@app.command()
def generate(
    context: Optional[Path] = typer.Argument(None, help="context audio (wav, flac, ogg, mp3): the music the stem must "
                                             "fit; or a folder of contexts (or a .txt list of files): each one's stem "
                                             "goes to --out FOLDER, all through one batched run (StemGen models)"),
    instrument: Optional[str] = typer.Option(None, "--instrument", "-i", help="instrument of the new stem (see "
                                             "`stemgen info`); several, comma-separated (drums,bass), layer one after "
                                             "another (StemGen models)"),
    text: Optional[str] = typer.Option(None, "--text", "-t", help="MAGNeT models: the music to generate, e.g. "
                                       "\"90s rock with heavy drums\"; or @PROMPTS.txt: one prompt per line, each to "
                                       "--out FOLDER/NNN.wav, all in one batch"),
    seconds: Optional[float] = typer.Option(None, "--seconds", help="MAGNeT: length of the music (default: the "
                                            "model's segment, e.g. 10 s; longer runs window by window)"),
    span_arrangement: Optional[str] = typer.Option(None, "--span-arrangement", help="MAGNeT: nonoverlap (the "
                                                   "paper's) or stride1 (overlapping spans)"),
    max_cfg_coef: Optional[float] = typer.Option(None, "--max-cfg-coef", help="MAGNeT: CFG coefficient at the "
                                                 "first step of a level (annealed to --min-cfg-coef)"),
    min_cfg_coef: Optional[float] = typer.Option(None, "--min-cfg-coef", help="MAGNeT: CFG coefficient at the "
                                                 "last step of a level"),
    out: Path = typer.Option(..., "--out", "-o", help="output stem (.wav; .flac, .ogg, .mp3 where libsndfile "
                             "writes them); a folder for layering and folder runs"),
    keep: Optional[Path] = typer.Option(None, "--keep", help="an existing take of the instrument (MAGNeT: a "
                                        "recording): keep it, and regenerate only --regenerate's ranges (or continue "
                                        "it to the context's end / to --seconds)"),
    regenerate: Optional[str] = typer.Option(None, "--regenerate", help="time ranges of --keep to regenerate, "
                                             "START:END seconds, comma-separated (e.g. 4.0:8.0,12:14)"),
    force: bool = typer.Option(False, "--force", help="folder runs: regenerate outputs that already exist"),
    window: Optional[float] = typer.Option(None, "--window", help="long contexts: seconds per generation window "
                                           "(default: the model's training window)"),
    overlap: Optional[float] = typer.Option(None, "--overlap", help="long contexts: seconds each window continues "
                                            "from the one before (default: a quarter window)"),
    model: str = typer.Option("demo", "--model", "-m", help="model directory, 'demo' (the trained toy-band model) "
                              "or 'random' (random weights: noise)"),
    mix: Optional[Path] = typer.Option(None, "--mix", help="also write context + stem here"),
    seed: int = typer.Option(0, "--seed", help="random seed (same seed, same output)"),
    steps: Optional[str] = typer.Option(None, "--steps", help="decoding steps per level, e.g. 128,64,32,32, or a "
                                        "preset: paper, magnet (20,10,10,10), soundstorm (16,1,1,1)"),
    guidance: Optional[str] = typer.Option(None, "--guidance", help="multi (3 rows), single (2) or none (1)"),
    cfg_context: Optional[float] = typer.Option(None, "--cfg-context", help="multi-source CFG weight of the context"),
    cfg_instrument: Optional[float] = typer.Option(None, "--cfg-instrument", help="multi-source CFG weight of the instrument"),
    cfg_scale: Optional[float] = typer.Option(None, "--cfg-scale", help="single-source CFG weight"),
    w_causal: Optional[float] = typer.Option(None, "--w-causal", help="causal-bias ranking: weight of the "
                                             "position term (1 - n/N), paper 0.1; 0 is VampNet-like"),
    w_confidence: Optional[float] = typer.Option(None, "--w-confidence", help="ranking: weight of the sampled "
                                                 "token's probability (paper 0.1)"),
    w_random: Optional[float] = typer.Option(None, "--w-random", help="ranking: weight of the uniform noise "
                                             "(paper 1.0)"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="sampling temperature (0: greedy)"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="keep the k most likely codes (0: off)"),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="nucleus sampling mass (1.0: off)"),
    variations: int = typer.Option(1, "--variations", "-n", help="stems to generate (seeds seed, seed+1, ...)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16, float16 (default: bf16 on GPU)"),
    cuda_graphs: Optional[bool] = typer.Option(None, "--cuda-graphs/--no-cuda-graphs",
                                               help="replay each step's trunk from a CUDA graph (GPU; default: on "
                                               "for one context unless STEMGEN_CUDA_GRAPHS=0; folder runs "
                                               "only with --cuda-graphs)"),
    bits: str = typer.Option("16", "--bits", help="output WAV sample format: 16, 24 or float"),
):
    """Generate a stem that fits CONTEXT and write it (and optionally the new mix).

    Also: regenerate a region of a take (--keep TAKE --regenerate 4:8) or continue it (--keep alone),
    layer several instruments (-i drums,bass --out DIR/), or run a whole folder (CONTEXT = DIR/).
    On a CPU the paper's 256 steps take about 1-2x real time with the demo model on 2 cores (a
    paper-size LM: about 25x that); --steps magnet is about 3x faster."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .engine import Engine
    from .engine.audio import SUBTYPES, AudioError, check_distinct, check_output_path, read_audio, write_audio_set
    from .engine.config import check_guidance
    from .engine.request import check_steps
    from .workflows import edit_take, parse_regions

    _route_warnings()
    knobs = dict(seed=seed, steps=run_guarded(_parse_steps, steps), guidance=guidance, cfg_context=cfg_context,
                 cfg_instrument=cfg_instrument, cfg_scale=cfg_scale, w_causal=w_causal, w_confidence=w_confidence,
                 w_random=w_random, temperature=temperature, top_k=top_k, top_p=top_p,
                 span_arrangement=span_arrangement, max_cfg_coef=max_cfg_coef, min_cfg_coef=min_cfg_coef)
    if text is not None:
        if context is not None or instrument is not None:
            fail("--text is for MAGNeT models, which take no context or --instrument (a StemGen model takes those)")
        from .magnet_cli import generate_text
        return generate_text(text, out, model, seconds, keep, regenerate, window, overlap, mix, variations, device,
                             dtype, bits, knobs)
    if context is None or instrument is None:
        fail("give a CONTEXT and --instrument (StemGen models), or --text (MAGNeT models)")

    instruments = [s.strip() for s in instrument.split(",") if s.strip()]
    mode = "folder" if context.is_dir() or context.suffix.lower() == ".txt" else \
        "layers" if len(instruments) > 1 else "single"

    def load_engine():
        engine = Engine.from_pretrained(_model_dir(model), device=device, dtype=dtype, cuda_graphs=cuda_graphs)
        engine.require_kind("stemgen")
        for inst in instruments:
            engine.instrument_id(inst)
        sampling = engine.sampling(**knobs)
        check_steps(sampling.steps, engine.config.lm.n_q)
        check_guidance(sampling.guidance, engine.kind)   # before any work: folder runs say it once
        return engine, sampling

    if bits not in SUBTYPES:
        fail(f"--bits must be 16, 24 or float, got {bits!r}")
    if not instruments:
        fail("--instrument names no instrument")
    if mode != "single" and (keep or regenerate or mix or variations != 1):
        fail("--keep, --regenerate, --mix and --variations apply to a single context and instrument")
    if regenerate and not keep:
        fail("--regenerate needs --keep TAKE (the stem whose ranges are regenerated)")
    if mode == "folder":
        return _generate_folder(context, instruments, out, force, bits, load_engine)
    if mode == "layers":
        return _generate_layers(context, instruments, out, bits, load_engine)
    instrument = instruments[0]

    def prepare():
        if not 1 <= variations <= 64:
            raise AudioError(f"--variations must be between 1 and 64, got {variations}")
        outs = [check_output_path(_numbered(out, i, variations), bits) for i in range(variations)]
        mixes = [check_output_path(_numbered(mix, i, variations), bits) for i in range(variations)] if mix else []
        check_distinct([context] + ([keep] if keep else []), outs + mixes)
        regions = parse_regions(regenerate)
        audio, sr = read_audio(context)
        engine, sampling = load_engine()
        x, ctx = engine.prepare_context(audio, sr)
        return engine, sampling, x, ctx, outs, mixes, sr, regions

    engine, sampling, x, ctx, outs, mixes, context_sr, regions = run_guarded(prepare)
    win, ovl = run_guarded(engine.window_frames, window, overlap)
    plan = run_guarded(engine.windows, ctx.shape[-1], win, ovl)
    check_seed_range(sampling.seed, variations, 1 if keep else len(plan), 1)   # --keep: one request each
    _note_untrained(engine)
    duration = x.shape[1] / engine.codec.cfg.sample_rate
    if len(plan) > 1:
        _say("note:", "bold", f"{duration:.1f} s context: {len(plan)} windows of "
             f"{(plan[0][1] - plan[0][0]) / engine.codec.cfg.frame_rate:.1f} s")
    total = sum(sampling.steps) * variations * len(plan)
    t0 = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as bar:
        task = bar.add_task("decoding", total=total)
        advance = lambda q, t, n: bar.advance(task)  # noqa: E731
        if keep is not None:
            results = run_guarded(edit_take, engine, x, ctx, keep, context_sr, regions, instrument, sampling,
                                  progress=advance, variations=variations)[0]
        elif len(plan) > 1:
            results = [run_guarded(engine.generate_long, x, ctx, instrument, progress=advance,
                                   sampling=dataclasses.replace(sampling, seed=sampling.seed + i),
                                   window=win, overlap=ovl) for i in range(variations)]
        else:
            results = run_guarded(engine.generate_from_context, x, ctx, instrument, variations=variations,
                                  progress=advance, sampling=sampling)
    wall = time.perf_counter() - t0
    items = []
    for i, res in enumerate(results):
        items.append((outs[i], res.stem, res.sample_rate))
        if res.gain < 1.0:
            err_console.print(f"note: stem scaled by {res.gain:.3f} to avoid clipping", highlight=False, markup=False)
        if mixes:
            items.append((mixes[i], res.mix()[0], res.sample_rate))
    run_guarded(write_audio_set, items, bits)  # all files or none
    written = ", ".join(str(p) for p in outs + mixes)
    console.print(f"wrote {written}: {duration:.2f} s of audio x {variations} in {wall:.2f} s "
                  f"(real-time factor {wall / (duration * variations):.2f}, "
                  f"{duration * variations / wall:.2f}x real time)", highlight=False)


def _note_untrained(engine) -> None:
    if engine.config.untrained:
        _say("note:", "bold yellow", "this model's weights are untrained (random): the audio is noise. "
             "Use --model demo (the trained toy-band model) or a converted trained model for music.")


def _generate_layers(context: Path, instruments: list[str], out: Path, bits: str, load_engine):
    """-i drums,bass,...: each instrument for the mix so far; every stem and the final mix in OUT/."""
    import time

    from .engine.audio import check_distinct, read_audio, write_audio_set
    from .workflows import layer

    def prepare():
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out}: layering writes a folder (stems and the mix); give a folder path")
        if not out.parent.is_dir():
            raise ValueError(f"--out {out}: parent folder {out.parent} does not exist")
        files = [out / f"{i + 1}_{inst}.wav" for i, inst in enumerate(instruments)] + [out / "mix.wav"]
        check_distinct([context], files)
        audio, sr = read_audio(context)
        engine, sampling = load_engine()
        x, _ = engine.prepare_context(audio, sr)
        return engine, sampling, x, files

    engine, sampling, x, files = run_guarded(prepare)
    _note_untrained(engine)
    t0 = time.perf_counter()
    stems, mix = run_guarded(layer, engine, x, instruments, sampling)
    out.mkdir(exist_ok=True)
    sr = engine.codec.cfg.sample_rate
    from .engine.audio import peak_safe
    items = [(f, stem, sr) for f, (_, stem) in zip(files, stems)] + [(files[-1], peak_safe(mix)[0], sr)]
    run_guarded(write_audio_set, items, bits)
    console.print(f"wrote {len(stems)} stems and the mix to {out} in {time.perf_counter() - t0:.2f} s",
                  highlight=False, markup=False)


def _report_files(summary: dict, out: Path) -> None:
    """The closing line of a many-file run (folder mode, generate-dataset); exit 1 if nothing was written
    because every file failed."""
    rate = f" ({summary['audio_s_per_s']:.2f}x real time)" if summary.get("audio_s_per_s") else ""
    console.print(f"{summary['written']} of {summary['files']} files written to {out} "
                  f"({summary['skipped_existing']} existed, {summary['failed']} failed): "
                  f"{summary['audio_s']:.1f} s of audio in {summary['wall_s']:.1f} s{rate}", highlight=False, markup=False)
    if summary["failed"] and not summary["written"]:
        raise typer.Exit(1)


def _generate_folder(src: Path, instruments: list[str], out: Path, force: bool, bits: str, load_engine):
    """CONTEXT = a folder or a .txt list: every file's stem in OUT/, through one batched run."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .workflows import collect_inputs, folder_outputs, run_folder

    if len(instruments) != 1:
        fail("a folder run generates one instrument; give one -i")

    def prepare():
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out}: a folder run writes a folder; give a folder path")
        files, outs, rejected = folder_outputs(src, collect_inputs(src), out)
        engine, sampling = load_engine()
        out.mkdir(parents=True, exist_ok=True)
        return files, outs, rejected, engine, sampling

    files, outs, rejected, engine, sampling = run_guarded(prepare)
    _note_untrained(engine)
    with Progress(TextColumn("files"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as bar:
        task = bar.add_task("files", total=len(files))
        summary = run_folder(engine, files, outs, instruments[0], sampling, bits, force,
                             log=lambda m: _say("warning:", "yellow", m),
                             progress=lambda i, n: bar.update(task, completed=i, total=n), rejected=rejected)
    engine.close()
    _report_files(summary, out)


@app.command()
def bench(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="engine model directory (default: a preset "
                                         "with random weights)"),
    config: str = typer.Option("auto", "--config", help="preset when no --model: paper, small, tiny "
                               "(auto: paper on CUDA, small on the CPU)"),
    duration: Optional[float] = typer.Option(None, "--duration", help="seconds of audio (auto: 20 on CUDA, 10 CPU)"),
    steps: Optional[str] = typer.Option(None, "--steps", help="steps per level (auto: 128,64,32,32 on CUDA, "
                                        "16,8,4,4 on the CPU)"),
    batch: str = typer.Option("1,8", "--batch", help="comma-separated batch sizes (requests at once)"),
    guidance: str = typer.Option("multi", "--guidance", help="multi, single or none"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="engine dtype (default: the engine's default)"),
    cuda_graphs: Optional[bool] = typer.Option(None, "--cuda-graphs/--no-cuda-graphs",
                                               help="engine replays the trunk from CUDA graphs (GPU; default: on, "
                                               "unless STEMGEN_CUDA_GRAPHS=0)"),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline", help="also run the fp32 training-form baseline"),
    seed: int = typer.Option(0, "--seed"),
    load: int = typer.Option(0, "--load", help="busy-loop processes kept running beside the whole benchmark "
                             "(a busy machine: e.g. 1 on 2 cores)"),
    repeat: int = typer.Option(1, "--repeat", help="runs of each side per batch, alternating engine and baseline; "
                               "each side's best is its figure (a machine whose speed drifts between runs)"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write all figures (and the machine) as JSON"),
):
    """Time whole generations: the engine vs the baseline a careful peer user runs, same process."""
    from .bench import rate, result_rows, run_bench
    from .engine.api import pick_device

    def work():
        dev = pick_device(device)
        gpu = dev.type == "cuda"
        if batch.strip() == "" or not all(b.strip().isdigit() and int(b) > 0 for b in batch.split(",")):
            raise ValueError(f"--batch must be comma-separated positive integers, got {batch!r}")
        if json_path is not None and not json_path.parent.is_dir():
            raise ValueError(f"--json: folder {json_path.parent} does not exist")
        return run_bench(model_dir=model, config_name=("paper" if gpu else "small") if config == "auto" else config,
                         duration=duration or (20.0 if gpu else 10.0),
                         steps=_parse_steps(steps) or ((128, 64, 32, 32) if gpu else (16, 8, 4, 4)),
                         batches=tuple(int(b) for b in batch.split(",")), device=dev, dtype=dtype,
                         baseline=baseline, guidance=guidance, seed=seed, cuda_graphs=cuda_graphs, load=load,
                         repeat=repeat, log=lambda m: err_console.print(m, highlight=False, soft_wrap=True))

    report = run_guarded(work)
    t = Table(title="stemgen bench")
    for col in ("batch", "run", "wall s", "step ms", "passes/s", "frames/s", "audio s / s", "peak MB", "ratio"):
        t.add_column(col, justify="right")
    for r, name, s in result_rows(report):
        ratio = f"{r['speedup_frames_per_s']:.2f}x" if name == "engine" and "baseline" in r else ""
        t.add_row(str(r["batch"]), name, f"{s['wall_s']:.2f}", f"{s['step_latency_ms']:.1f}",
                  f"{s['transformer_passes_per_s']:.1f}", rate(s['frames_per_s']),
                  rate(s['audio_s_per_wall_s']), f"{s['peak_mb']:.0f}", ratio)
    Console(soft_wrap=True, width=max(console.width, 130)).print(t)
    m, st = report["machine"], report["settings"]
    console.print(f"machine: {m.get('gpu') or m['processor'] + ' (' + m['cpu_features'] + ')'}, {m['cpu_threads']} threads, torch {m['torch']}"
                  + (f", {st['load']} busy process(es) beside it" if st.get("load") else "") + "; "
                  f"engine {st['engine_dtype']}, baseline {st['baseline_dtype'] or 'not run'}"
                  + (f"; STEMGEN_FLASH_CONFIG={m['flash_config']}" if m.get("flash_config") else "")
                  + "".join(f"; {k}={v}" for k, v in m.get("cpu_isa_limits", {}).items()), highlight=False)
    if json_path is not None:
        run_guarded(atomic_write_text, json_path, json.dumps(report, indent=2) + "\n")


@app.command("bench-report")
def bench_report(files: list[Path] = typer.Argument(..., help="JSON files from `stemgen bench --json` and/or "
                                                    "`pytest bench/ --benchmark-json`"),
                 out: Path = typer.Option(Path("bench/RESULTS.md"), "--out", "-o", help="Markdown file to write"),
                 title: str = typer.Option("Benchmark results", "--title")):
    """Render benchmark JSON files (machine, device, figures, ratios) into one Markdown page."""
    from .report import write

    def work():
        if not out.parent.is_dir():
            raise ValueError(f"--out: folder {out.parent} does not exist")
        write(files, out, title)

    run_guarded(work)
    console.print(f"wrote {out} from {len(files)} file(s)", highlight=False)


@app.command("serve")
def serve_cmd(model: str = typer.Option("demo", "--model", "-m", help="model directory, 'demo' or 'random'"),
              host: str = typer.Option("127.0.0.1", "--host"),
              port: int = typer.Option(8000, "--port"),
              device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
              dtype: Optional[str] = typer.Option(None, "--dtype"),
              max_upload_mb: float = typer.Option(50.0, "--max-upload-mb", help="largest accepted upload"),
              max_seconds: float = typer.Option(600.0, "--max-seconds", help="longest accepted context"),
              max_sync_seconds: float = typer.Option(30.0, "--max-sync-seconds",
                                                     help="longest context for POST /v1/generate"),
              max_jobs: int = typer.Option(64, "--max-jobs", help="jobs in flight (and kept for download)"),
              job_timeout: float = typer.Option(1800.0, "--job-timeout", help="seconds before a job is cancelled"),
              shutdown_grace: float = typer.Option(5.0, "--shutdown-grace",
                                                   help="SIGTERM: seconds given to open connections before they "
                                                   "are cut (jobs in flight are cancelled at once)"),
              cuda_graphs: Optional[bool] = typer.Option(None, "--cuda-graphs/--no-cuda-graphs",
                                                         help="replay each step's trunk from CUDA graphs (GPU; "
                                                         "default off for the server: not yet run on a GPU "
                                                         "beside concurrent codec work)")):
    """Serve the engine over HTTP (FastAPI + uvicorn): jobs, status, results, cancel, metrics, /docs.
    Needs the serve extra: pip install -e '.[serve]'."""
    import socket

    try:
        import uvicorn  # noqa: F401

        from .serve import Limits, create_app, run_server
    except ImportError as e:
        fail(f"stemgen serve needs the serve extra ({e.name} is missing): pip install -e '.[serve]'")
    from .engine import Engine
    from .engine.api import check_environment

    limits = Limits(max_upload_mb=max_upload_mb, max_seconds=max_seconds, max_sync_seconds=max_sync_seconds,
                    max_jobs=max_jobs, job_timeout_s=job_timeout, shutdown_grace_s=shutdown_grace)

    def check():   # every option and STEMGEN_* variable, before the model loads
        if not 1 <= port <= 65535:
            raise ValueError(f"--port {port}: must be from 1 to 65535")
        limits.check()
        check_environment()

    run_guarded(check)
    try:   # bind now, so that a taken port or a bad host fails before the model loads
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except (OSError, OverflowError) as e:
        fail(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}")
    engine = run_guarded(lambda: Engine.from_pretrained(_model_dir(model), device=device, dtype=dtype,
                                                        cuda_graphs=cuda_graphs))
    app_ = run_guarded(create_app, engine, limits)
    run_server(app_, host, port, shutdown_grace=shutdown_grace, sock=sock)


@app.command("generate-dataset")
def generate_dataset_cmd(
    src: Path = typer.Argument(..., help="folder of contexts (recursive) or a .txt list of files"),
    instrument: str = typer.Option(..., "--instrument", "-i"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (mirrors the input tree)"),
    model: str = typer.Option("demo", "--model", "-m"),
    ray_address: Optional[str] = typer.Option(None, "--ray", help="address of an existing Ray cluster (e.g. "
                                              "ray://head:10001 or auto); default: Ray on this machine"),
    workers: int = typer.Option(1, "--workers", help="engine actors (one per GPU, or per CPU group)"),
    cpus_per_worker: int = typer.Option(1, "--cpus-per-worker"),
    gpus_per_worker: float = typer.Option(0, "--gpus-per-worker"),
    batch_size: int = typer.Option(8, "--batch-size", help="contexts per actor batch (share forwards)"),
    seed: int = typer.Option(0, "--seed"),
    steps: Optional[str] = typer.Option(None, "--steps"),
    device: str = typer.Option("cpu", "--device", help="device inside each actor: cpu or cuda"),
    dtype: Optional[str] = typer.Option(None, "--dtype"),
    bits: str = typer.Option("16", "--bits"),
    force: bool = typer.Option(False, "--force", help="regenerate outputs that already exist"),
):
    """Generate stems for a dataset of contexts on Ray (local, or --ray ADDRESS): resumable, retried
    on worker failure. Needs the cluster extra: pip install -e '.[cluster]'."""
    try:
        import ray  # noqa: F401
    except ImportError:
        fail("generate-dataset needs Ray: pip install -e '.[cluster]'")
    for name, v in (("--workers", workers), ("--cpus-per-worker", cpus_per_worker), ("--batch-size", batch_size)):
        if not 1 <= v <= 1 << 16:
            fail(f"{name} {v}: give 1 to 65536")
    if not 0 <= gpus_per_worker <= 64:   # NaN too
        fail(f"--gpus-per-worker {gpus_per_worker}: give 0 to 64 (fractions share a GPU)")
    if device == "cuda" and gpus_per_worker == 0:
        fail("--device cuda needs --gpus-per-worker > 0: Ray gives an actor without GPUs none to see")
    if gpus_per_worker > 0 and ray_address is None:
        # a local Ray waits forever for GPUs the machine does not have: say so instead
        import torch
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            fail(f"--gpus-per-worker {gpus_per_worker:g}: this machine has no CUDA GPU that torch can use; drop "
                 "the option (and --device cuda), or give --ray ADDRESS of a cluster with GPUs")
        if workers * gpus_per_worker > n:
            fail(f"--workers {workers} x --gpus-per-worker {gpus_per_worker:g} need {workers * gpus_per_worker:g} "
                 f"GPUs; this machine has {n}")
    from .dataset import generate_dataset
    from .engine import Engine
    from .engine.fileutil import clear_stale_temporaries
    from .workflows import collect_inputs, folder_outputs

    def prepare():
        model_dir = _model_dir(model)
        engine = Engine.from_pretrained(model_dir, device="cpu", load_codec_weights=False)
        engine.instrument_id(instrument)
        sampling = engine.sampling(seed=seed, steps=_parse_steps(steps))
        files, outs, rejected = folder_outputs(src, collect_inputs(src), out)
        out.mkdir(parents=True, exist_ok=True)
        clear_stale_temporaries(outs)
        return str(model_dir), sampling, files, outs, rejected

    model_dir, sampling, files, outs, rejected = run_guarded(prepare)
    summary = run_guarded(generate_dataset, files, outs, model_dir, instrument, sampling, address=ray_address,
                          rejected=rejected,
                          workers=workers, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                          batch_size=batch_size, device=device, dtype=dtype, bits=bits, force=force,
                          log=lambda m: _say("warning:", "yellow", m))
    _report_files(summary, out)


@app.command("make-corpus")
def make_corpus_cmd(out: Path = typer.Argument(..., help="output folder (new or empty)"),
                    songs: int = typer.Option(20, "--songs", help="number of songs"),
                    seed: int = typer.Option(0, "--seed", help="random seed (same seed, same corpus)"),
                    sr: int = typer.Option(44100, "--sr", help="sample rate")):
    """Write a toy-band multi-stem corpus (Slakh2100 layout) with known tempo, meter, key and chords."""
    from rich.progress import Progress

    from .evaluation.corpus import make_corpus

    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("rendering", total=songs)
        path = run_guarded(make_corpus, out, songs, seed, sr, progress=lambda i, n: bar.update(task, completed=i))
    console.print(f"wrote {songs} songs to {path}")


def _train_logger():
    """Plain log lines (one per call) on stderr; used when stderr is not a terminal."""
    return lambda msg: err_console.print(msg, highlight=False, markup=False, soft_wrap=True)


@app.command("train-codec")
def train_codec_cmd(corpus: Path = typer.Argument(..., help="Slakh2100-layout corpus (e.g. from `stemgen make-corpus`)"),
                    out: Path = typer.Option(..., "--out", help="run folder: last.pt (resumable), metrics.jsonl, "
                                             "compression_state_dict.bin (the export)"),
                    steps: int = typer.Option(1400, "--steps"),
                    batch_size: int = typer.Option(8, "--batch-size"),
                    lr: float = typer.Option(1e-3, "--lr"),
                    n_filters: int = typer.Option(16, "--n-filters", help="SEANet width (MusicGen's codec: 64)"),
                    dimension: int = typer.Option(64, "--dimension", help="latent / codebook dimension"),
                    bins: int = typer.Option(512, "--bins", help="codes per RVQ level"),
                    n_q: int = typer.Option(4, "--n-q", help="RVQ levels"),
                    songs: int = typer.Option(0, "--songs", help="use the first N tracks (0: all)"),
                    warmup: int = typer.Option(50, "--warmup"),
                    l1_weight: float = typer.Option(0.1, "--l1-weight", help="weight of the waveform L1 term"),
                    bass_weight: float = typer.Option(0.0, "--bass-weight", help="weight of the bass-band (1 kHz) "
                                                      "STFT term"),
                    chroma_weight: float = typer.Option(0.0, "--chroma-weight", help="weight of the harmony term: L1 "
                                                        "between output's and input's pitch-class profiles, 150-2500 Hz "
                                                        "(0: off; the demo's stage 5 used 5)"),
                    fft_sizes: str = typer.Option("8192,4096,2048,1024,512,256", "--fft-sizes",
                                                  help="FFT sizes of the multi-resolution STFT loss"),
                    init_from: Optional[Path] = typer.Option(None, "--init-from", help="start from another run's "
                                                             "export or last.pt (a fine-tuning stage)"),
                    stop_at: Optional[int] = typer.Option(None, "--stop-at", help="stop after this step (the "
                                                          "schedule still spans --steps)"),
                    seed: int = typer.Option(0, "--seed"),
                    threads: int = typer.Option(0, "--threads", help="CPU threads (0: torch's default)")):
    """Train a small Encodec (SEANet + RVQ, 50 frames/s) on a corpus; resumes from OUT/last.pt.
    The export converts with `stemgen convert --codec OUT/compression_state_dict.bin`."""
    from .train.codec import CodecTrainConfig, train_codec

    for name, w in (("--l1-weight", l1_weight), ("--bass-weight", bass_weight), ("--chroma-weight", chroma_weight)):
        if not w >= 0:
            fail(f"{name} {w}: a loss weight must be 0 or more")
    try:
        ffts = [int(n) for n in fft_sizes.split(",")]
    except ValueError:
        fail(f"--fft-sizes {fft_sizes!r}: give comma-separated integers, e.g. 2048,1024,512")
    if not 0 <= threads <= 4096:
        fail(f"--threads {threads}: give 0 (torch's default) to 4096")
    cfg = CodecTrainConfig(steps=steps, batch_size=batch_size, lr=lr, n_filters=n_filters, dimension=dimension,
                           bins=bins, n_q=n_q, songs=songs, seed=seed, warmup=min(warmup, max(steps, 0)),
                           l1_weight=l1_weight, bass_weight=bass_weight, chroma_weight=chroma_weight, fft_sizes=ffts,
                           init_from=str(init_from or ""))
    run_guarded(cfg.check, stop_at=stop_at)   # every option and the memory, before anything is read or allocated
    path = run_guarded(train_codec, corpus, out, cfg, log=_train_logger(), threads=threads or None, stop_at=stop_at)
    console.print(f"wrote {path}")


@app.command("train")
def train_cmd(corpus: Path = typer.Argument(..., help="Slakh2100-layout corpus (toy-band or real Slakh2100)"),
              codec: Path = typer.Option(..., "--codec", help="codec: an engine model directory or any source "
                                         "`stemgen convert --codec` reads (e.g. a train-codec export)"),
              out: Path = typer.Option(..., "--out", help="run folder: last.pt (resumable), model.pt (final), "
                                       "metrics.jsonl, loss.png; tokens cached in OUT/tokens unless --cache"),
              cache: Optional[Path] = typer.Option(None, "--cache", help="token cache folder (reused if it matches)"),
              preset_name: str = typer.Option("small", "--preset", help="model preset: paper, small, tiny"),
              d_model: Optional[int] = typer.Option(None, "--d-model"),
              n_layers: Optional[int] = typer.Option(None, "--n-layers"),
              n_heads: Optional[int] = typer.Option(None, "--n-heads"),
              frames: int = typer.Option(500, "--frames", help="crop length in codec frames (training window)"),
              batch_size: int = typer.Option(16, "--batch-size", help="pairs per step (per process)"),
              steps: int = typer.Option(2000, "--steps"),
              lr: float = typer.Option(1e-3, "--lr"),
              warmup: int = typer.Option(100, "--warmup"),
              decay_every: int = typer.Option(1000, "--decay-every", help="steps per x decay-rate of the lr"),
              decay_rate: float = typer.Option(0.3, "--decay-rate"),
              val_songs: int = typer.Option(8, "--val-songs", help="held-out tracks (the corpus' last ones)"),
              contexts: str = typer.Option("all", "--contexts", help="context mixes to tokenise: all (every subset "
                                           "of the other stems) or rest (one other stem, or all of them)"),
              val_every: int = typer.Option(200, "--val-every"),
              seed: int = typer.Option(0, "--seed"),
              autocast: str = typer.Option("auto", "--autocast", help="auto (bf16 where native), bf16 or off"),
              device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
              threads: int = typer.Option(0, "--threads", help="CPU threads (0: torch's default)"),
              blank_prob: float = typer.Option(0.0, "--blank-prob", help="share of pairs trained as the sampler's "
                                               "first step: level 0 with every target frame masked (not in SPEC; "
                                               "meant to make the model lean on the context; default 0)"),
              full_context_prob: float = typer.Option(0.0, "--full-context-prob", help="share of pairs whose "
                                                      "context is every other stem (the whole band) before the "
                                                      "uniform draw of SPEC 5 (not in SPEC; default 0)"),
              init_from: Optional[Path] = typer.Option(None, "--init-from", help="start from this LM checkpoint's "
                                                       "weights (model.pt or last.pt) with a fresh optimizer and "
                                                       "schedule; only read at step 0 (resuming OUT/last.pt ignores it)")):
    """Train the StemGen LM (SPEC 5); resumes exactly from OUT/last.pt. Works under torchrun (DDP).
    Convert the result: `stemgen convert --lm OUT/model.pt --codec CODEC --out MODEL_DIR`."""
    import torch

    from .engine.api import pick_device
    from .train.data import CONTEXT_SETS, tokenize_corpus
    from .train.trainer import TrainConfig, check_train_config, train_lm
    from .weights_convert.codec import load_codec_any

    overrides = {k: v for k, v in dict(d_model=d_model, n_layers=n_layers, n_heads=n_heads).items() if v is not None}
    if autocast not in ("auto", "bf16", "off"):
        fail(f"--autocast {autocast!r}: use auto, bf16 or off")
    if not 0.0 <= blank_prob <= 1.0:
        fail(f"--blank-prob {blank_prob}: give a share between 0 and 1")
    if not 0.0 <= full_context_prob <= 1.0:
        fail(f"--full-context-prob {full_context_prob}: give a share between 0 and 1")
    if contexts not in CONTEXT_SETS:
        fail(f"--contexts {contexts!r}: use one of {', '.join(CONTEXT_SETS)}")
    if not 0 <= threads <= 4096:
        fail(f"--threads {threads}: give 0 (torch's default) to 4096")
    if init_from is not None and not init_from.is_file() and not (out / "last.pt").is_file():
        fail(f"--init-from {init_from}: no such file; give an LM checkpoint (model.pt or last.pt)")
    cfg = TrainConfig(preset=preset_name, model=overrides, frames=frames, batch_size=batch_size, steps=steps,
                      lr=lr, warmup=warmup, decay_every=decay_every, decay_rate=decay_rate, val_songs=val_songs,
                      val_every=val_every, seed=seed, autocast=autocast, blank_prob=blank_prob,
                      full_context_prob=full_context_prob, init_from=str(init_from or ""))
    dev = str(run_guarded(pick_device, device))
    run_guarded(check_train_config, cfg, None, dev)     # every option and the memory, before the codec or corpus
    if threads:
        torch.set_num_threads(threads)

    def work():
        cdc, codec_key = load_codec_any(codec)
        overrides.setdefault("codebook_size", cdc.cfg.bins)
        overrides.setdefault("n_q", cdc.cfg.n_q)
        check_train_config(cfg, None, dev)
        log = _train_logger()
        cache_dir = tokenize_corpus(corpus, cdc, codec_key, cache or out / "tokens", contexts=contexts, log=log)
        if sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            with Progress(TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                          TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=err_console) as bar:
                task = bar.add_task("train", total=steps, info="")
                return train_lm(cache_dir, out, cfg, device=dev, log=log,
                                progress=lambda i, n, loss, rate: bar.update(
                                    task, completed=i, info=f"loss {loss:.3f} | {rate:.0f} frames/s"))
        return train_lm(cache_dir, out, cfg, device=dev, log=log)

    path = run_guarded(work)
    console.print(f"wrote {path}")


@app.command("table3")
def table3_cmd(model: str = typer.Option("demo", "--model", "-m", help="model directory or 'demo'"),
               corpus: Path = typer.Option(..., "--corpus", help="held-out toy-band corpus (a seed never trained on)"),
               out: Path = typer.Option(..., "--out", help="folder for the stems, per-song scores and the table"),
               songs: int = typer.Option(40, "--songs"),
               seconds: float = typer.Option(10.0, "--seconds", help="context length (the model's training window)"),
               steps: Optional[str] = typer.Option("magnet", "--steps", help="steps per level or a preset"),
               seed: int = typer.Option(0, "--seed"),
               stems: Optional[str] = typer.Option(None, "--stems",
                                                   help="stems to generate, comma-separated (default: bass and drums)"),
               settings: Optional[str] = typer.Option(None, "--settings",
                                                      help="settings to run, comma-separated, e.g. naive,paper "
                                                      "(default: all five)"),
               dtype: str = typer.Option("float32", "--dtype", help="engine dtype: float32, bfloat16 or int8 (the "
                                         "CPU's int8 path)")):
    """The paper's Table 3 at toy scale: naive / paper settings / the model's default settings / deaf
    (another song's context) / codec ceiling, scored against each song's ground truth (chord roots,
    beat grid, tempo), MIRDD and FAD."""
    from .engine import Engine
    from .evaluation.listening import INSTRUMENTS, SETTINGS, markdown_table, run_table3

    def work():
        engine = Engine.from_pretrained(_model_dir(model), device="cpu", dtype=dtype)
        try:
            res = run_table3(engine, corpus, out, songs=songs, seconds=seconds, steps=_parse_steps(steps),
                             seed=seed, log=_train_logger(), instruments=INSTRUMENTS if stems is None else _csv(stems),
                             settings=SETTINGS if settings is None else _csv(settings))
        finally:
            engine.close()
        res["dtype"] = dtype
        atomic_write_text(out / "table3.json", json.dumps(res, indent=1))
        atomic_write_text(out / "table3.md", markdown_table(res["table"]) + "\n")
        return res

    res = run_guarded(work)
    console.print(markdown_table(res["table"]), markup=False, highlight=False)


@app.command("codec-harmony")
def codec_harmony_cmd(codec: Path = typer.Argument(..., help="codec: an engine model directory (e.g. engine/demo_model) "
                                                  "or any source `stemgen convert --codec` reads (a train-codec export)"),
                      corpus: Path = typer.Option(..., "--corpus", help="toy-band corpus (`stemgen make-corpus`)"),
                      songs: int = typer.Option(10, "--songs")):
    """Does a codec keep the chords? Chord roots read from the pad and from a bass's context, as rendered
    and after the codec; the bass's root after the codec (Table 3's ceiling)."""
    from .evaluation.listening import codec_harmony
    from .weights_convert.codec import load_codec_any

    res = run_guarded(lambda: codec_harmony(load_codec_any(codec)[0], corpus, songs))
    for name, v in res.items():
        if name != "bars":
            console.print(f"{name:33s} {v:.3f}", markup=False, highlight=False)
    console.print(f"(share of {res['bars']} bars whose chord root is read right; bass: mean over songs)")


@app.command("export-pairs")
def export_pairs_cmd(corpus: Path = typer.Argument(..., help="Slakh2100-layout corpus (real Slakh or make-corpus)"),
                     instrument: str = typer.Option(..., "--instrument", "-i", help="inst_class of the target stem, "
                                                    "e.g. Bass, Drums, Guitar"),
                     out: Path = typer.Option(..., "--out", help="output folder: context/ and stem/ inside")):
    """Export (context, stem) pairs: contexts to generate for, reference stems for `stemgen eval`."""
    from rich.progress import Progress

    from .evaluation.corpus import export_pairs

    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("exporting", total=None)
        n = run_guarded(export_pairs, corpus, instrument, out,
                        progress=lambda i, k: bar.update(task, completed=i, total=k))
    console.print(f"wrote {n} pairs to {out}/context and {out}/stem")


@app.command("convert-vggish")
def convert_vggish_cmd(src: Path = typer.Argument(..., help="VGGish checkpoint (e.g. vggish-10086976.pth)"),
                       out: Path = typer.Option(..., "--out", help="output .safetensors for `stemgen eval --embedder`")):
    """Convert a VGGish checkpoint to safetensors for FAD."""
    from .evaluation.vggish import convert_vggish

    def work():
        if not out.parent.is_dir():
            raise ValueError(f"{out.parent}: output folder does not exist")
        return convert_vggish(src, out)

    console.print(f"wrote {run_guarded(work)}")


@app.command("eval")
def eval_cmd(generated: Path = typer.Option(..., "--generated", help="folder of generated stems"),
             reference: Path = typer.Option(..., "--reference", help="folder of reference (real) stems"),
             context: Optional[Path] = typer.Option(None, "--context", help="folder of contexts, same file names: "
                                                    "MIRDD then compares stem + context mixes"),
             embedder: str = typer.Option("logmel", "--embedder", help="logmel (weight-free) or a converted VGGish "
                                          "weight file (.safetensors)"),
             json_path: Optional[Path] = typer.Option(None, "--json", help="write the figures as JSON")):
    """FAD and MIRDD between generated and reference stems."""
    from rich.progress import Progress

    from .evaluation.run import evaluate

    def work():
        emb = None
        if embedder != "logmel":
            from .evaluation.vggish import VGGishEmbedder
            emb = VGGishEmbedder(embedder)
        if json_path is not None and not json_path.parent.is_dir():
            raise ValueError(f"--json: folder {json_path.parent} does not exist")
        with Progress(console=err_console, transient=True) as bar:
            task = bar.add_task("analysing", total=None)
            return evaluate(generated, reference, context, embedder=emb,
                            progress=lambda i, n: bar.update(task, completed=i, total=n))

    report = run_guarded(work)
    t = Table(title="stemgen eval", show_header=True)
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_row(f"FAD ({report['fad_embedder']})", f"{report['fad']:.4f}")
    t.add_row("MIRDD (mean KL)", f"{report['mirdd']:.4f}")
    for k, v in report["mirdd_table"].items():
        t.add_row(f"  {k}", f"{v:.4f}")
    Console(soft_wrap=True, width=max(console.width, 100)).print(t)
    if report["fad_embedder"] == "logmel-stats":
        err_console.print("note: log-mel FAD is for comparing runs with each other, not with published (VGGish) "
                          "FAD figures", highlight=False)
    if json_path is not None:
        run_guarded(atomic_write_text, json_path, json.dumps(report, indent=2) + "\n")


def _escape_help_markup() -> None:
    """Typer renders help texts as rich markup, where '[serve]' is a style tag and vanishes
    ("pip install -e '.'"): escape every bracketed word in the commands' docstrings and options'
    help, so the help says what the source says."""
    import inspect

    from rich.markup import escape
    from typer.models import ParameterInfo

    for info in app.registered_commands:
        if info.help:
            info.help = escape(info.help)
        if info.callback.__doc__:
            info.callback.__doc__ = escape(info.callback.__doc__)
        for param in inspect.signature(info.callback).parameters.values():
            if isinstance(param.default, ParameterInfo) and param.default.help:
                param.default.help = escape(param.default.help)


_escape_help_markup()


def main():  # pragma: no cover
    sys.exit(app())
