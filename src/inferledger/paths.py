"""Where inferledger keeps files that outlive a process (caches, state)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The data directory: ``$INFERLEDGER_HOME``, else ``~/.cache/inferledger``."""
    configured = os.environ.get("INFERLEDGER_HOME")
    root = Path(configured).expanduser() if configured else Path.home() / ".cache" / "inferledger"
    root.mkdir(parents=True, exist_ok=True)
    return root
