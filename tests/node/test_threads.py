"""The node's threads carry their names in the OS, where top -H and bench/load.py read them."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from inferledger.node.threads import name_os_thread, named_pool

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _os_name(native_id: int) -> str:
    return Path(f"/proc/self/task/{native_id}/comm").read_text().strip()


def test_a_pool_worker_has_its_prefix_as_its_os_name() -> None:
    pool = named_pool(1, "generate")
    try:
        native_id = pool.submit(threading.get_native_id).result(timeout=60)
        assert _os_name(native_id) == "generate_0"
    finally:
        pool.shutdown()


def test_a_named_thread_drops_the_package_prefix_and_fits_the_kernel_limit() -> None:
    seen: list[str] = []

    def run() -> None:
        name_os_thread()
        seen.append(_os_name(threading.get_native_id()))

    worker = threading.Thread(target=run, name="inferledger-state-writer-with-a-long-name")
    worker.start()
    worker.join(timeout=60)
    assert seen == ["state-writer-wi"]  # 15 bytes: what the kernel keeps
