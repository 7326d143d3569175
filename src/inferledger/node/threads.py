"""The node's worker threads under their own names in the OS too.

Python 3.11 names a thread for Python only; ``top -H``, ``ps -L`` and ``/proc/<pid>/task``
show every worker as ``python``. With the name given to the OS as well, an operator (and
``bench/load.py``) can see which of the node's threads spends the CPU: the generation pool,
the ``to_thread`` pool, the state writer, the settlement worker.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

_PR_SET_NAME = 15  # prctl(2); the kernel keeps the first 15 bytes


@functools.cache
def _prctl() -> ctypes._NamedFuncPointer | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def name_os_thread() -> None:
    """Give the calling thread's Python name to the OS (Linux; elsewhere nothing)."""
    prctl = _prctl()
    if prctl is not None:
        name = threading.current_thread().name.removeprefix("inferledger-")
        prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def named_pool(workers: int, prefix: str) -> ThreadPoolExecutor:
    """A thread pool whose workers carry ``prefix`` in the OS as well."""
    return ThreadPoolExecutor(workers, thread_name_prefix=prefix, initializer=name_os_thread)
