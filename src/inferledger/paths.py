"""Where inferledger keeps files that outlive a process (caches, state)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

STALE_TEMP_SECONDS = 3600
"""Age after which a cache's temporary sibling is a crashed writer's leftover, not work in
progress (deriving or converting a model takes seconds to minutes)."""


def home() -> Path:
    """The data directory: ``$INFERLEDGER_HOME``, else ``~/.cache/inferledger``."""
    configured = os.environ.get("INFERLEDGER_HOME")
    root = Path(configured).expanduser() if configured else Path.home() / ".cache" / "inferledger"
    root.mkdir(parents=True, exist_ok=True)
    return root


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary sibling, fsync it and rename it over ``path``.

    Readers see the old file or the new one, never a partial write, even with concurrent
    writers or a crash. The file is private to its owner (mode 0600, as ``mkstemp`` makes it).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temps(target: Path) -> None:
    """Delete the temporary siblings (``.<name>.tmp-*``, files or directories) that writers
    of ``target`` killed mid-write left behind; young ones may belong to a live writer."""
    cutoff = time.time() - STALE_TEMP_SECONDS
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            if leftover.stat().st_mtime >= cutoff:
                continue
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        except FileNotFoundError:
            continue  # its writer finished or another cleaner got there first
