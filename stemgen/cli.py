"""The `stemgen` command line."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="StemGen engine: generate a stem that fits a musical context.")
console = Console()
err_console = Console(stderr=True)


def fail(msg: str, code: int = 1):
    err_console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def run_guarded(fn, *args, **kwargs):
    """Turn expected user errors into one clear line and a nonzero exit."""
    from .engine.config import ModelFormatError
    try:
        return fn(*args, **kwargs)
    except (ModelFormatError, ValueError, FileNotFoundError, NotImplementedError) as e:
        fail(str(e))


@app.command()
def info(model_dir: Path = typer.Argument(..., help="engine model directory (made by `stemgen convert`)"),
         device: str = typer.Option("auto", help="device to report backends for: auto, cpu, cuda"),
         as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON")):
    """Show a model directory's config, size, dtype and the backends that would run it."""
    from .engine.api import backends, pick_device
    from .engine.config import ModelConfig
    from .engine.model import expected_shapes

    def gather():
        cfg = ModelConfig.load(model_dir)
        n_params = sum(math.prod(s) for s in expected_shapes(cfg.lm).values())
        stored = _stored_dtype(model_dir / cfg.weights["lm"])
        return cfg, n_params, stored, backends(pick_device(device))

    cfg, n_params, stored, be = run_guarded(gather)
    if as_json:
        print(json.dumps({"config": cfg.to_dict(), "lm_parameters": n_params, "stored_dtype": stored,
                          "backends": be}, indent=2))
        return
    t = Table(title=f"stemgen model: {model_dir}", show_header=False)
    lm = cfg.lm
    rows = [("LM", f"d_model {lm.d_model}, {lm.n_heads} heads, {lm.n_layers} layers, ffn {lm.ffn_hidden}"),
            ("tokens", f"Q = {lm.n_q} levels x {lm.codebook_size} codes, {lm.n_channels} channels "
                       f"(last = target)"),
            ("conditions", f"{len(lm.cond_sizes)} source(s), sizes {list(lm.cond_sizes)}"),
            ("parameters", f"{n_params / 1e6:.2f} M"),
            ("stored dtype", stored),
            ("instruments", ", ".join(cfg.instruments)),
            ("codec", "none (add one with `stemgen convert --codec SRC`)" if not cfg.codec else
             json.dumps(cfg.codec)),
            ("sampling", ", ".join(f"{k}={v}" for k, v in cfg.sampling.to_dict().items()))]
    rows += [(f"backend: {k}", v) for k, v in be.items()]
    for k, v in rows:
        t.add_row(k, v)
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
def convert(lm: Path = typer.Option(..., "--lm", help="LM checkpoint (a stemgen training checkpoint)"),
            out: Path = typer.Option(..., "--out", help="output model directory (must not exist unless --force)"),
            codec: Optional[Path] = typer.Option(None, "--codec", help="codec weights (see the codec converter)"),
            lm_format: Optional[str] = typer.Option(None, "--lm-format", help="override format detection: train"),
            dtype: str = typer.Option("float32", help="stored weight dtype: float32, bfloat16, float16"),
            force: bool = typer.Option(False, "--force", help="replace an existing output directory")):
    """Convert checkpoints into one engine model directory (config.json + safetensors)."""
    from .engine.config import ModelConfig
    from .engine.model import resolve_dtype
    from .weights_convert import convert_train_checkpoint, write_model_dir

    def work():
        if codec is not None:
            raise NotImplementedError("--codec: codec conversion is not implemented in this version yet; "
                                      "convert the LM alone for now")
        lm_cfg, instruments, lm_state = convert_train_checkpoint(lm, lm_format, resolve_dtype(dtype))
        config = ModelConfig(lm=lm_cfg, instruments=instruments, dtype=str(resolve_dtype(dtype)).split(".")[-1])
        return write_model_dir(out, config, {"lm": lm_state}, overwrite=force)

    path = run_guarded(work)
    console.print(f"wrote {path}")


def main():  # pragma: no cover
    sys.exit(app())
