"""Small helpers for atomic outputs (write to a temporary sibling, then rename)."""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


TEMP_MARK = ".stemgen-"     # every temporary this project writes: .stemgen-<pid>-<name>.<random>.tmp
_TEMP = re.compile(r"\.stemgen-(\d+)-(.+)\.[A-Za-z0-9_]+\.tmp")


def read_bounded(path: str | Path, limit: int) -> bytes:
    """A file's bytes, reading at most ``limit`` + 1 of them: a device or a pipe (/dev/zero) has no
    size to check first. ValueError naming the file if it holds more; OSError as open() raises it."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path}: larger than {limit} bytes")
    return data


def temp_prefix(name: str) -> str:
    """mkstemp/mkdtemp prefix of a temporary for ``name``: marked as ours and by our process, so a
    cleanup can never take another program's (or a live run's) hidden ``.*.tmp`` files."""
    return f"{TEMP_MARK}{os.getpid()}-{name}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0   # someone else's live process (or a pid that cannot be ours): leave it
    return True


def clear_stale_temporaries(outputs: list[Path]) -> int:
    """Remove what a killed writer of ``outputs`` left beside them: only temporaries named by
    ``temp_prefix`` for one of these outputs, of a process no longer running. Returns how many."""
    by_dir: dict[Path, set[str]] = {}
    for o in outputs:
        by_dir.setdefault(Path(o).parent, set()).add(Path(o).name)
    n = 0
    for folder, names in by_dir.items():
        try:
            entries = [e.name for e in os.scandir(folder) if e.name.startswith(TEMP_MARK)]
        except OSError:
            continue
        for entry in entries:
            m = _TEMP.fullmatch(entry)
            if m and m.group(2) in names and not _alive(int(m.group(1))):
                (folder / entry).unlink(missing_ok=True)
                n += 1
    return n


def output_error(path: str | Path, e: BaseException):
    """One line for a failed write of ``path``: the OS's reason where the writer kept it (an OSError,
    safetensors' "(os error N)"); torch's stream writer keeps none, so then a guess, said as one."""
    import errno

    from .errors import OutputError

    code = e.errno if isinstance(e, OSError) else None
    if code is None and (m := re.search(r"os error (\d+)", str(e))):
        code = int(m.group(1))
    if code is not None:
        reason = os.strerror(code)
        if code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            reason += "; free some space (or raise the file-size limit) and run again"
    else:
        reason = "the write failed (a full disk or a file-size limit?)"
        try:
            if shutil.disk_usage(Path(path).parent).free < 1 << 20:
                reason = "the write failed: the disk is full"
        except OSError:
            pass
    return OutputError(f"cannot write {path}: {reason}; nothing was replaced")


def default_permissions(path: str | Path) -> None:
    """Give a file/folder made by mkstemp/mkdtemp (private, 0600/0700) the permissions a plain
    open()/mkdir() would have had under the current umask, before it is renamed into place."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_dir(out: str | Path, replace: bool = False):
    """Yield a temporary sibling folder to fill; when the block succeeds it becomes ``out`` (an
    absent or empty folder, or any existing one with ``replace``); when it fails it is removed,
    so no half-written output is ever left at ``out``."""
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name), suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        default_permissions(tmp)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            if not replace:
                raise FileExistsError(f"{out}: exists and is not empty")
            if not out.is_dir():
                raise FileExistsError(f"{out}: exists and is not a folder; choose another name")
            # the old folder steps aside under a fresh temporary name of ours (a fixed name could be
            # a user's folder), then goes
            old = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name), suffix=".tmp", dir=out.parent))
            os.rename(out, old)      # a folder onto our empty one
            os.rename(tmp, out)
            _remove(old)
        else:
            if out.exists():
                out.rmdir()
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


@contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary sibling path to write; on success it replaces ``path`` (with the
    umask's permissions), on failure it is removed."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise output_error(path, e) from None
    os.close(fd)
    try:
        yield Path(tmp)
        default_permissions(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):   # the block writes the file: its OS errors are write errors
            raise output_error(path, e) from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
