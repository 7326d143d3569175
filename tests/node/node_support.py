"""Node test helpers and fixtures: a node on loopback serving a session opened on chain.

Imported by name (``from node_support import ...``) by the node, SDK and CLI tests;
tests/node/conftest.py registers the fixtures for the node tests.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.sync.client import ClientConnection as SyncConnection

from inferledger.chain.contracts import Contracts
from inferledger.chain.devchain import INPUT_PRICE, PRICE, DevWorld, dev_account
from inferledger.chain.receipts import session_salt
from inferledger.config import load_settings
from inferledger.inference import Backend, load_backend
from inferledger.node.node import Node, create_node
from inferledger.node.server import BackgroundServer
from inferledger.node.state import NodeState
from inferledger.protocol.server import Challenge, parse_node_frame
from inferledger.sdk.sealed import SealedSocket, client_handshake, start_channel
from inferledger.sdk.wire import Expectation, session_read_headers

NodeFactory = Callable[..., tuple[Node, BackgroundServer]]


def serve_model(
    world: DevWorld,
    backend: Backend,
    sha256: bytes,
    price: int = PRICE,
    input_price: int = INPUT_PRICE,
) -> bytes:
    """Approve the backend's model and make it the world's host's only model; its id.
    ``price`` is the output price, ``input_price`` the prompt price, per Mtok."""
    c = world.contracts
    model_id = c.models.approve_model(world.owner, backend.name, sha256)
    c.nodes.set_models(world.host, {model_id: (input_price, price)})
    return model_id


def expect(world: DevWorld) -> Expectation:
    """What an SDK client of the world's host checks the node's challenge against."""
    return Expectation(world.contracts.marketplace.domain(), world.host.address)


def user_salt(world: DevWorld, session_id: int, signer_key: bytes | str) -> bytes:
    """The bundle salt the SDK derived for the session and sent the node at login."""
    return session_salt(signer_key, world.contracts.marketplace.domain(), session_id)


def read_session(
    node_url: str, world: DevWorld, session_id: int, signer_key: bytes | str
) -> httpx.Response:
    """``GET /v1/sessions/{id}`` signed by the session signer, as the route requires."""
    headers = session_read_headers(signer_key, expect(world), session_id)
    return httpx.get(f"{node_url}/v1/sessions/{session_id}", headers=headers, timeout=10)


@pytest.fixture
def start_node(world: DevWorld, tmp_path: Path) -> Iterator[NodeFactory]:
    """Start nodes for the world's host; all are stopped at the end of the test."""
    servers: list[BackgroundServer] = []

    def start(
        backend: Backend, *, contracts: Contracts | None = None, **settings: object
    ) -> tuple[Node, BackgroundServer]:
        options = {
            "host_key": "0x" + dev_account("host").key.hex(),
            "chain_url": world.chain.url,
            "state_db": tmp_path / f"node{len(servers)}.sqlite3",
            **settings,
        }
        node = create_node(
            load_settings(**options),
            contracts=contracts or world.contracts,
            backend=backend,
            state=NodeState(Path(str(options["state_db"]))),
        )
        server = BackgroundServer(node).start()
        servers.append(server)
        return node, server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def scripted() -> Backend:
    return load_backend("scripted", tokens_per_second=0)


def wait_for_receipt(node: Node, session_id: int, tokens: int, timeout: float = 10.0) -> None:
    """The last receipt of a reply is stored just after its ``done`` frame; wait for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stored = node.state.latest_receipt(session_id)
        if stored is not None and stored.tokens >= tokens:
            return
        time.sleep(0.01)
    raise AssertionError(f"no receipt for {tokens} tokens of session {session_id} in {timeout}s")


def wait_until(predicate: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


async def open_sealed(url: str, **connect: Any) -> tuple[SealedSocket, dict[str, Any]]:
    """A hand-driven connection with the sealed channel up (``key_share`` sent), for frames
    a real client never would send: (the socket, which sends and reads JSON text; the
    challenge)."""
    ws = await websockets.connect(url, **connect)
    challenge = parse_node_frame(await asyncio.wait_for(ws.recv(), 20))
    assert isinstance(challenge, Challenge), challenge
    return await start_channel(ws, challenge), challenge.dump()


class SyncSealed:
    """``open_sealed`` for a ``websockets.sync`` connection."""

    def __init__(self, ws: SyncConnection) -> None:
        self.ws = ws
        challenge = parse_node_frame(ws.recv(20))
        assert isinstance(challenge, Challenge), challenge
        self.challenge = challenge.dump()
        share, self.channel = client_handshake(challenge)
        ws.send(share)

    def send(self, frame: str | bytes) -> None:
        self.ws.send(self.channel.seal(frame.encode() if isinstance(frame, str) else frame))

    def recv(self, timeout: float) -> dict[str, Any]:
        return dict(json.loads(self.channel.open(self.ws.recv(timeout))))
