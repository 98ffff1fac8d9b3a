"""What every command of the CLI shares (`stemgen.cli`, `stemgen.magnet_cli`): the consoles, the
one-line errors, and the model and output names. Kept apart so the command modules import it, not
each other."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console


def printable(text) -> str:
    """Untrusted text (file and instrument names, paths, messages quoting them) for a terminal:
    control and format characters (escape sequences, newlines, bidi overrides) written as Python
    escapes, so nothing a file names can move the cursor, recolour the terminal or add a line."""
    text = str(text)
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class _PlainConsole(Console):
    """A console whose plain strings are printed as they are: never read as rich markup (paths may
    hold '['), never highlighted, control characters escaped (see ``printable``)."""

    def print(self, *objects, **kwargs):
        objects = tuple(printable(o) if isinstance(o, str) else o for o in objects)
        kwargs.setdefault("markup", False)
        kwargs.setdefault("highlight", False)
        super().print(*objects, **kwargs)


console = _PlainConsole(soft_wrap=True)
err_console = _PlainConsole(stderr=True)


def _say(label: str, style: str, msg: str) -> None:
    """One line on stderr; the message is plain text, never read as markup (paths may hold '['),
    its control characters escaped (a newline in a file name cannot split the line)."""
    from rich.text import Text
    err_console.print(Text.assemble((label, style), " ", printable(msg)), highlight=False, soft_wrap=True)


def fail(msg: str, code: int = 1):
    _say("error:", "bold red", msg)
    raise typer.Exit(code)


def run_guarded(fn, *args, **kwargs):
    """Turn expected user errors into one clear line and a nonzero exit."""
    from .engine.config import ModelFormatError
    try:
        return fn(*args, **kwargs)
    except (ModelFormatError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    except OSError as e:
        fail(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "))


def _numbered(path: Path, i: int, n: int) -> Path:
    return path if n == 1 else path.with_name(f"{path.stem}_{i + 1}{path.suffix}")


def _model_dir(model: str) -> Path:
    """'demo' -> the packaged trained demo model; 'random' -> the random-weights model (built and
    cached on first use); else the path."""
    if model == "random":
        from .random_model import ensure_random_model
        return ensure_random_model(log=lambda m: err_console.print(m, highlight=False, markup=False))
    from .engine.models import resolve_model
    return resolve_model(model)


def check_seed_range(seed: int, variations: int, windows: int, window_step: int) -> None:
    """Variation i of window k runs with seed + i + window_step * k (StemGen 1, MAGNeT 1000): the last
    of them must fit a seed (2^63 - 1), said before generating."""
    last = seed + variations - 1 + window_step * (windows - 1)
    if last > (1 << 63) - 1:
        fail(f"--seed {seed} with {variations} variation(s) and {windows} window(s) takes seeds up to {last}, "
             "past the largest (2^63 - 1): give a smaller --seed")
