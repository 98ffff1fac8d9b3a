"""Small helpers for atomic outputs (write to a temporary sibling, then rename)."""
from __future__ import annotations

import os
from pathlib import Path


def default_permissions(path: str | Path) -> None:
    """Give a file/folder made by mkstemp/mkdtemp (private, 0600/0700) the permissions a plain
    open()/mkdir() would have had under the current umask, before it is renamed into place."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask)
