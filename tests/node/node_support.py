"""Node test helpers and fixtures: a node on loopback serving a session opened on chain.

Imported by name (``from node_support import ...``) by the node, SDK and CLI tests;
tests/node/conftest.py registers the fixtures for the node tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.sync.client import ClientConnection as SyncConnection

from inferledger.chain.contracts import Contracts
from inferledger.chain.devchain import INPUT_PRICE, PRICE, DevWorld, dev_account
from inferledger.chain.receipts import (
    Receipt,
    ReceiptDomain,
    SessionAuth,
    session_salt,
    sign_receipt,
    sign_session_auth,
)
from inferledger.config import load_settings
from inferledger.inference import Backend, load_backend
from inferledger.node import connection
from inferledger.node.node import Node, create_node
from inferledger.node.server import BackgroundServer
from inferledger.node.state import NodeState
from inferledger.protocol.server import Challenge, parse_node_frame
from inferledger.sdk.sealed import SealedSocket, client_handshake, start_channel
from inferledger.sdk.wire import Expectation, session_read_headers

NodeFactory = Callable[..., tuple[Node, BackgroundServer]]

ONE_TOKEN_STEPS = 0.0  # every generation step returns one token, as a model's do
WHOLE_STEPS = math.inf  # a step returns every token that may be sent now


@contextlib.contextmanager
def generation_steps(seconds: float) -> Iterator[None]:
    """Pin how long the in-process nodes' generation steps gather tokens. The node asks
    for receipts at the end of a step, so where it asks depends on where steps end; with the
    scripted backend that is the machine's speed unless pinned (``ONE_TOKEN_STEPS`` or
    ``WHOLE_STEPS``)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(connection, "_BATCH_SECONDS", seconds)
        yield


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


def session_init_frame(
    challenge: dict[str, Any], session_id: int, key: bytes, nonce: bytes | None = None
) -> dict[str, Any]:
    """The ``session_init`` that logs in to ``session_id`` with ``key``, over ``nonce`` (by
    default the challenge's), under the challenge's domain."""
    domain = challenge_domain(challenge)
    nonce = nonce or bytes.fromhex(str(challenge["nonce"])[2:])
    auth = SessionAuth(session_id, nonce, str(challenge["host"]))
    return {
        "type": "session_init",
        "session_id": session_id,
        "nonce": "0x" + nonce.hex(),
        "signature": "0x" + sign_session_auth(key, domain, auth).hex(),
        "salt": "0x" + session_salt(key, domain, session_id).hex(),
    }


def challenge_domain(challenge: dict[str, Any]) -> ReceiptDomain:
    """The receipt domain a challenge names."""
    return ReceiptDomain(int(challenge["chain_id"]), str(challenge["marketplace"]))


def signed_receipt(
    request: dict[str, Any], session_id: int, key: bytes, domain: ReceiptDomain
) -> dict[str, Any]:
    """The ``receipt`` frame that signs ``request`` as asked."""
    proof_hash = bytes.fromhex(request["proof_hash"][2:])
    receipt = Receipt(session_id, request["input_tokens"], request["output_tokens"], proof_hash)
    return {
        "type": "receipt",
        "input_tokens": request["input_tokens"],
        "output_tokens": request["output_tokens"],
        "proof_hash": request["proof_hash"],
        "signature": "0x" + sign_receipt(key, domain, receipt).hex(),
    }


def _frames(message: str | bytes) -> list[dict[str, Any]]:
    """A node message as its frames: one, or a JSON array of those it had ready at once."""
    data = json.loads(message)
    return data if isinstance(data, list) else [data]


class NodeFrames:
    """An ``open_sealed`` socket that reads the node's frames one at a time, as dicts
    (bounded in time); it sends and closes as the socket does."""

    def __init__(self, ws: SealedSocket) -> None:
        self.ws = ws
        self._ready: deque[dict[str, Any]] = deque()

    async def next(self, timeout: float = 20) -> dict[str, Any]:
        if not self._ready:
            self._ready.extend(_frames(await asyncio.wait_for(self.ws.recv(), timeout)))
        return self._ready.popleft()

    async def send(self, text: str) -> None:
        await self.ws.send(text)

    async def close(self) -> None:
        await self.ws.close()


class SyncSealed:
    """``open_sealed`` for a ``websockets.sync`` connection."""

    def __init__(self, ws: SyncConnection) -> None:
        self.ws = ws
        challenge = parse_node_frame(ws.recv(20))
        assert isinstance(challenge, Challenge), challenge
        self.challenge = challenge.dump()
        share, self.channel = client_handshake(challenge)
        ws.send(share)
        self._ready: deque[dict[str, Any]] = deque()

    def send(self, frame: str | bytes) -> None:
        self.ws.send(self.channel.seal(frame.encode() if isinstance(frame, str) else frame))

    def recv(self, timeout: float) -> dict[str, Any]:
        """The next node frame (a message may hold several)."""
        if not self._ready:
            self._ready.extend(_frames(self.channel.open(self.ws.recv(timeout))))
        return self._ready.popleft()
