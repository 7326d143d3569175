"""A relay between the SDK and a real node, on loopback, on both chains.

The relay is everything on the path a user cannot see (a reverse proxy, a hijacked DNS
name, a shared network). Passive, it reads only the challenge and ``key_share``; posing as
the host, it fails the handshake before the client sends anything; tampering with a frame
(flipped, replayed, dropped, reordered), it ends the connection with ``BAD_SEAL``, and the
session, resumed directly, is billed exactly the tokens the client holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import websockets
from eth_account import Account
from eth_utils import keccak
from node_support import NodeFactory, expect, serve_model, user_salt, wait_until

from inferledger.chain.devchain import DevWorld
from inferledger.chain.receipts import sign_host_challenge
from inferledger.inference import Backend
from inferledger.protocol.channel import KeyPair
from inferledger.sdk.wire import History, SessionClient, SessionError
from support import open_session

SECRET = "the password is zanzibar-7741"
PROMPT = [{"role": "user", "content": SECRET}]
BOUND = 30.0  # seconds: the most one step may take on a loaded machine

Message = str | bytes
Rewrite = Callable[[int, Message], list[Message]]
"""What the relay forwards for the n-th message of one direction (n from 0)."""


def honest(_n: int, message: Message) -> list[Message]:
    return [message]


@dataclass
class Relay:
    """Forwards one connection at a time to ``upstream``, rewriting each direction."""

    upstream: str
    to_client: Rewrite = honest
    to_node: Rewrite = honest
    seen_by_client: list[Message] = field(default_factory=list)  # as forwarded
    seen_by_node: list[Message] = field(default_factory=list)

    async def handle(self, downstream: Any) -> None:
        async with websockets.connect(self.upstream, max_size=2**22) as node:
            pumps = [
                asyncio.create_task(
                    self._pump(node, downstream, self.to_client, self.seen_by_client)
                ),
                asyncio.create_task(self._pump(downstream, node, self.to_node, self.seen_by_node)),
            ]
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    @staticmethod
    async def _pump(source: Any, sink: Any, rewrite: Rewrite, seen: list[Message]) -> None:
        n = 0
        with contextlib.suppress(websockets.ConnectionClosed):
            async for message in source:
                for forwarded in rewrite(n, message):
                    seen.append(forwarded)
                    await sink.send(forwarded)
                n += 1
        await sink.close()


@contextlib.asynccontextmanager
async def relaying(relay: Relay) -> AsyncIterator[str]:
    async with websockets.serve(relay.handle, "127.0.0.1", 0, max_size=2**22) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/v1/ws"


def _session(world: DevWorld, scripted: Backend, start_node: NodeFactory) -> tuple[int, Any, str]:
    model_id = serve_model(world, scripted, keccak(text="scripted"))
    session_id, signer = open_session(world, model_id=model_id, proof_interval=10)
    _node, server = start_node(scripted, max_unreceipted_tokens=8, disconnect_grace=3600)
    return session_id, signer, server.ws_url


def test_a_passive_relay_sees_no_prompt_token_or_salt(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    session_id, signer, url = _session(world, scripted, start_node)
    relay = Relay(url)

    async def run() -> str:
        async with relaying(relay) as via:
            client = await SessionClient.connect(via, session_id, signer.key, expect=expect(world))
            reply = await client.chat(PROMPT, max_tokens=30)
            await client.end()
            await client.wait_settlement(BOUND)
            await client.close()
            return reply.text

    text = asyncio.run(asyncio.wait_for(run(), 120))
    assert len(text) > 30
    # In plaintext: the challenge one way, key_share the other; every other frame binary.
    plain_from_node = [m for m in relay.seen_by_client if isinstance(m, str)]
    plain_from_client = [m for m in relay.seen_by_node if isinstance(m, str)]
    assert [json.loads(m)["type"] for m in plain_from_node] == ["challenge"]
    assert [json.loads(m)["type"] for m in plain_from_client] == ["key_share"]
    sealed = [m for m in relay.seen_by_client + relay.seen_by_node if isinstance(m, bytes)]
    # The tokens, receipts and settlement went through the relay: with a window of 8, at
    # least 4 receipt requests one way and 4 receipts the other, besides login and end.
    assert len(sealed) > 10
    salt = user_salt(world, session_id, signer.key)
    secrets = [SECRET.encode(), text.encode(), text[:12].encode(), salt, salt.hex().encode()]
    for frame in sealed + [m.encode() for m in plain_from_node + plain_from_client]:
        assert not any(secret in frame for secret in secrets)
    # Not one sealed frame is JSON to the relay.
    for frame in sealed:
        with pytest.raises(ValueError):
            json.loads(frame)


def _impostor_challenge(impostor: Any, world: DevWorld, resign: bool) -> Rewrite:
    """Swap the node's channel key for the relay's own (re-signed by the relay's key, or
    keeping the host's signature, which then covers another key)."""
    relay_key = KeyPair()

    def rewrite(n: int, message: Message) -> list[Message]:
        if n != 0:
            return [message]
        challenge = json.loads(message)
        challenge["node_key"] = "0x" + relay_key.public.hex()
        if resign:
            nonce = bytes.fromhex(challenge["nonce"][2:])
            domain = world.contracts.marketplace.domain()
            signature = sign_host_challenge(impostor.key, domain, nonce, relay_key.public)
            challenge["host_signature"] = "0x" + signature.hex()
        return [json.dumps(challenge)]

    return rewrite


@pytest.mark.parametrize("resign", [True, False], ids=["own-signature", "hosts-signature"])
def test_a_relay_posing_as_the_host_fails_the_handshake_before_the_client_sends_anything(
    world: DevWorld, scripted: Backend, start_node: NodeFactory, resign: bool
) -> None:
    session_id, signer, url = _session(world, scripted, start_node)
    impostor = Account.create()
    relay = Relay(url, to_client=_impostor_challenge(impostor, world, resign))

    async def run() -> SessionError:
        async with relaying(relay) as via:
            with pytest.raises(SessionError) as refused:
                await SessionClient.connect(via, session_id, signer.key, expect=expect(world))
            return refused.value

    refused = asyncio.run(asyncio.wait_for(run(), 60))
    assert refused.code == "BAD_HOST_SIGNATURE"
    assert world.host.address in str(refused)
    assert relay.seen_by_node == []  # no key_share, no session_init, no signature


def _at(k: int, kind: str) -> Rewrite:
    """Tamper with the k-th message of a direction (and keep the rest honest)."""
    held: list[Message] = []

    def rewrite(n: int, message: Message) -> list[Message]:
        if n < k or isinstance(message, str):
            return [message]
        if n == k:
            if kind == "flipped":
                assert isinstance(message, bytes)
                return [message[:-1] + bytes([message[-1] ^ 1])]
            if kind == "replayed":
                return [message, message]
            if kind == "dropped":
                return []
            held.append(message)  # reordered: sent after the next one
            return []
        if held:
            return [message, held.pop()]
        return [message]

    return rewrite


async def _resume(
    url: str, session_id: int, key: bytes, world: DevWorld, history: History
) -> SessionClient:
    """Log in again once the node has seen the relayed connection end (SESSION_BUSY until
    then: polled, with a generous bound)."""
    until = asyncio.get_running_loop().time() + BOUND
    while True:
        try:
            return await SessionClient.connect(
                url, session_id, key, expect=expect(world), history=history
            )
        except SessionError as busy:
            if busy.code != "SESSION_BUSY" or asyncio.get_running_loop().time() > until:
                raise
        await asyncio.sleep(0.05)


# Node-to-client messages: 0 challenge, 1 session_ready, 2 reply_start, 3.. tokens (receipt
# requests among them). Client-to-node: 0 key_share, 1 session_init, 2 prompt, 3 a receipt.
@pytest.mark.parametrize(
    ("direction", "kind"),
    [
        ("to_client", "flipped"),
        ("to_client", "replayed"),
        ("to_client", "dropped"),
        ("to_client", "reordered"),
        ("to_node", "flipped"),
        ("to_node", "replayed"),
    ],
)
def test_a_tampered_frame_ends_the_connection_and_nothing_unreceived_is_billed(
    world: DevWorld, scripted: Backend, start_node: NodeFactory, direction: str, kind: str
) -> None:
    session_id, signer, url = _session(world, scripted, start_node)
    relay = Relay(url, **{direction: _at(6 if direction == "to_client" else 3, kind)})
    market = world.contracts.marketplace

    async def run() -> tuple[SessionError, list[int], tuple[int, int]]:
        async with relaying(relay) as via:
            client = await SessionClient.connect(via, session_id, signer.key, expect=expect(world))
            with pytest.raises(SessionError) as broken:
                await client.chat(PROMPT, max_tokens=40)
            await client.close()
        held = tuple(t.token_id for t in client.tokens)
        signed = max(((r.input_tokens, r.tokens) for r in client.receipts), default=(0, 0))
        # Resumed directly: the node replays what we missed before we sign for it.
        history = History(
            token_ids=held, input_tokens=client.input_tokens, signed=signed, reply_open=True
        )
        resumed = await _resume(url, session_id, signer.key, world, history)
        await resumed.settle_up()
        ids = [*held[: resumed.start_tokens], *(t.token_id for t in resumed.tokens)]
        await resumed.end()
        settled = await resumed.wait_settlement(BOUND)
        await resumed.close()
        assert settled is not None and settled.type == "settled", settled
        return broken.value, ids, (settled.input_tokens, settled.output_tokens)

    broken, ids, paid = asyncio.run(asyncio.wait_for(run(), 120))
    assert broken.code == "BAD_SEAL", broken
    wait_until(lambda: market.get_session(session_id).is_settled, "the settlement", BOUND)
    info = market.get_session(session_id)
    # Paid for exactly the reply tokens the client ended up holding, no more.
    assert paid[1] == len(ids) == info.output_tokens_paid
    assert 0 < len(ids) < 40  # the reply was cut by the tampering
