"""Gateway fixtures: ``start_gateway`` over the SDK tests' market (a real node, scripted)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from gateway_support import Running
from sdk_support import Market, forget_open_sessions, market, scripted, start_node  # noqa: F401

from inferledger.config import load_settings
from inferledger.gateway import Gateway, GatewayServer
from inferledger.gateway.service import LocalModel

GatewayFactory = Callable[..., Running]


@pytest.fixture
def start_gateway(market: Market, tmp_path: Path) -> Iterator[GatewayFactory]:  # noqa: F811
    """Start gateways paying from the market's user; all are stopped (sessions closed)
    before the nodes stop. Settings are the gateway_* ones, as keyword arguments."""
    running: list[Running] = []

    def start(
        state: Path | None = None, local_model: LocalModel | None = None, **settings: object
    ) -> Running:
        state = state or tmp_path / f"gateway{len(running)}"
        config = load_settings(gateway_state_dir=state, **settings)
        client = market.client(sessions_dir=state / "sessions")
        gateway = Gateway(client, config, local_model=local_model)
        run = Running(gateway, GatewayServer(gateway).start(), client)
        running.append(run)
        return run

    yield start
    for run in running:
        run.stop()
