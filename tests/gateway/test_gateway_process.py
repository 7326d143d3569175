"""`inferledger gateway` as its own process: SIGTERM closes its sessions; after a kill,
the next start closes what the killed one left open."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from gateway_support import HELLO, MODEL
from node_support import wait_until
from openai import OpenAI

from inferledger.chain.devchain import dev_account

if TYPE_CHECKING:
    from sdk_support import Market


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_closes_the_sessions_and_a_restart_closes_what_a_kill_left(
    market: Market, tmp_path: Path
) -> None:
    world = market.world
    if world.chain.is_embedded:
        pytest.skip("another process cannot reach the embedded chain")
    deployment = tmp_path / "deployment.json"
    world.contracts.deployment.save(deployment)
    port = free_port()
    env = {
        **os.environ,
        "INFERLEDGER_CHAIN_URL": world.chain.url,
        "INFERLEDGER_DEPLOYMENT_FILE": str(deployment),
        "INFERLEDGER_KEY": "0x" + dev_account("user").key.hex(),
        "INFERLEDGER_HOME": str(tmp_path / "home"),
        "INFERLEDGER_CONFIG": str(tmp_path / "none.toml"),
        "INFERLEDGER_GATEWAY_PORT": str(port),
    }
    base_url = f"http://127.0.0.1:{port}/v1"

    def start() -> subprocess.Popen[str]:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "inferledger.cli.main", "gateway"],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )

        def up() -> bool:
            assert gateway.poll() is None, gateway.communicate()[1]
            try:
                return httpx.get(f"{base_url}/models").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, "the gateway to listen", timeout=120)  # a cold start imports a lot
        return gateway

    def ask() -> int:
        reply = OpenAI(base_url=base_url, api_key="unused", max_retries=0).chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=3
        )
        assert reply.usage is not None
        return reply.usage.model_extra["inferledger"]["session_id"]

    marketplace = world.contracts.marketplace
    killed = start()
    left_open = ask()
    killed.kill()
    killed.communicate(timeout=30)
    assert marketplace.get_session(left_open).is_open

    gateway = start()
    wait_until(lambda: marketplace.get_session(left_open).is_settled, "the leftover to settle", 120)
    served = ask()
    assert served != left_open
    gateway.send_signal(signal.SIGTERM)
    _, stderr = gateway.communicate(timeout=120)
    assert gateway.returncode in (0, -signal.SIGTERM), stderr  # uvicorn re-raises it
    assert f"closing session {served}: the gateway is shutting down" in stderr
    info = marketplace.get_session(served)
    assert info.is_settled and info.output_tokens_paid == 3, stderr
