"""Start and stop a local anvil (Foundry's dev chain) on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import requests

from inferledger.chain.errors import ChainError

ANVIL_PACKAGE = "@foundry-rs/anvil@1.7.1"


def find_anvil() -> str | None:
    """``$INFERLEDGER_ANVIL``, else ``node_modules`` of this checkout, else PATH.

    In ``node_modules`` the platform package's binary comes first: ``.bin/anvil`` is a
    Node.js launcher, and a signal sent to it (a stop, SIGSTOP in the fault tests) would
    not reach the chain it started."""
    configured = os.environ.get("INFERLEDGER_ANVIL")
    if configured:
        return configured
    for parent in [Path.cwd(), *Path(__file__).resolve().parents]:
        modules = parent / "node_modules"
        binaries = sorted(modules.glob("@foundry-rs/anvil-*/bin/anvil"))
        for candidate in [*binaries, modules / ".bin" / "anvil"]:
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return shutil.which("anvil")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Anvil:
    """A running anvil process; use as a context manager or call ``stop()``."""

    def __init__(self, process: subprocess.Popen[bytes], url: str) -> None:
        self.process = process
        self.url = url

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Anvil:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


STATE_INTERVAL_SECONDS = 5


def start_anvil(
    port: int | None = None, *, state_file: Path | None = None, timeout: float = 30.0
) -> Anvil:
    """Start anvil on 127.0.0.1 and wait until it answers JSON-RPC."""
    binary = find_anvil()
    if binary is None:
        raise ChainError(
            f"anvil not found: install it with `npm install {ANVIL_PACKAGE}` in the project "
            "directory, or set INFERLEDGER_ANVIL to the anvil binary"
        )
    port = port or free_port()
    args = [binary, "--host", "127.0.0.1", "--port", str(port), "--silent"]
    if state_file is not None:
        # Dumped every few seconds too, so a killed chain loses seconds, not the session.
        args += ["--state", str(state_file), "--state-interval", str(STATE_INTERVAL_SECONDS)]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
            raise ChainError(f"anvil exited with code {process.returncode}: {stderr.strip()}")
        try:
            body: dict[str, Any] = {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "eth_chainId",
                "params": [],
            }
            if requests.post(url, json=body, timeout=1).ok:
                return Anvil(process, url)
        except requests.RequestException:
            time.sleep(0.1)
    process.kill()
    raise ChainError(f"anvil did not answer on {url} within {timeout:.0f}s")
