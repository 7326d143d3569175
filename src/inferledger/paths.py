"""Where inferledger keeps files that outlive a process (caches, state)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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
