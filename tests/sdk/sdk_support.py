"""SDK test fixtures: a real node on loopback (scripted backend) and SDK clients.

Test modules load them with ``pytest_plugins = ["sdk_support"]``. The node fixtures are
the node tests' own (tests/node/node_support.py), so both suites start nodes the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import node_support
import pytest
from eth_utils import keccak
from node_support import NodeFactory, serve_model

from inferledger.chain.devchain import DevWorld, dev_account
from inferledger.inference import Backend
from inferledger.node.node import Node
from inferledger.node.server import BackgroundServer
from inferledger.sdk import Client, lifecycle

# The node tests' fixtures, registered here too for the modules that load this plugin.
start_node = node_support.start_node
scripted = node_support.scripted


@dataclass
class Market:
    """The dev world with the scripted model served by a running node."""

    world: DevWorld
    model_id: bytes
    node: Node
    server: BackgroundServer
    sessions_dir: Path

    def client(self, label: str = "user", **options: object) -> Client:
        options.setdefault("sessions_dir", self.sessions_dir)
        return Client(
            self.world.chain,
            key="0x" + dev_account(label).key.hex(),
            deployment=self.world.contracts.deployment,
            **options,  # type: ignore[arg-type]
        )


@pytest.fixture
def market(
    world: DevWorld, scripted: Backend, start_node: NodeFactory, tmp_path: Path
) -> Iterator[Market]:
    """A node serving the scripted model, registered on chain at its real URL."""
    model_id = serve_model(world, scripted, keccak(text="scripted"))
    node, server = start_node(scripted)
    world.contracts.nodes.update_url(world.host, server.url)
    yield Market(world, model_id, node, server, tmp_path / "sessions")
    for session in lifecycle.open_sessions():  # before the node stops
        session.detach()


@pytest.fixture(autouse=True)
def forget_open_sessions() -> Iterator[None]:
    """A test's sessions must not be closed at worker exit, long after its chain reverted."""
    yield
    for session in lifecycle.open_sessions():
        lifecycle.unregister(session)
