"""`inferledger node run` in its own process, for faults only a separate process can have:
a node killed with -9, a chain that stops answering, a reorganisation the node must notice
on its own (the test's chain connection and the node's share nothing)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from inferledger.chain.anvil import free_port
from inferledger.chain.devchain import DevWorld, dev_account

CLI = [sys.executable, "-m", "inferledger.cli.main"]


def needs_rpc(world: DevWorld, why: str) -> None:
    """Skip on the embedded chain, which lives inside the test's process; ``why`` says what
    the test needs that it cannot have there."""
    if world.chain.is_embedded:
        pytest.skip(f"the embedded chain runs in-process: {why}")


class NodeProcess:
    """One node process for the world's host, with its state in ``directory``."""

    def __init__(
        self, world: DevWorld, directory: Path, chain_url: str | None = None, **settings: object
    ) -> None:
        deployment = directory / "deployment.json"
        world.contracts.deployment.save(deployment)
        self.port = free_port()
        self.env = {
            **os.environ,
            "INFERLEDGER_CHAIN_URL": chain_url or world.chain.url,
            "INFERLEDGER_DEPLOYMENT_FILE": str(deployment),
            "INFERLEDGER_STATE_DB": str(directory / "node.sqlite3"),
            "INFERLEDGER_PROOF_STORE": str(directory / "proofs"),
            "INFERLEDGER_HOST_KEY": "0x" + dev_account("host").key.hex(),
            "INFERLEDGER_BACKEND": "scripted",
            **{f"INFERLEDGER_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self.log = directory / "node.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def start(self, timeout: float = 60.0) -> NodeProcess:
        """Start it and wait until ``/health`` answers 200."""
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*CLI, "node", "run", "--port", str(self.port)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.stop(signal.SIGKILL)
        raise AssertionError(f"node did not become healthy; its log:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def get(self, path: str) -> Any:
        return httpx.get(self.url + path, timeout=10).json()

    def __enter__(self) -> NodeProcess:
        return self if self.process is not None else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
