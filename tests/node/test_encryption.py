"""Encryption is not optional off dev chains, and a bad channel ends only its connection.

Plaintext needs both sides to ask, on a dev chain; everything else that tries it (a
client that skips ``key_share``, a relay that flips ``plaintext``, a node setting on a
public chain) ends in ``ENCRYPTION_REQUIRED``. A broken channel (an unusable key, a text
frame after ``key_share``) is ``BAD_SEAL``, and the node goes on serving others.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import websockets
from eth_utils import keccak
from node_support import NodeFactory, expect, open_sealed, serve_model, user_salt

from inferledger.chain.devchain import DevWorld, dev_account
from inferledger.chain.receipts import SessionAuth, sign_session_auth
from inferledger.inference import Backend
from inferledger.sdk import Client
from inferledger.sdk.errors import ConfigurationError
from inferledger.sdk.wire import SessionClient, SessionError
from support import open_session

HELLO = [{"role": "user", "content": "hello"}]
BOUND = 20.0


def _init(world: DevWorld, challenge: dict[str, Any], session_id: int, key: bytes) -> str:
    nonce = bytes.fromhex(challenge["nonce"][2:])
    auth = SessionAuth(session_id, nonce, world.host.address)
    signature = sign_session_auth(key, world.contracts.marketplace.domain(), auth)
    return json.dumps(
        {
            "type": "session_init",
            "session_id": session_id,
            "nonce": challenge["nonce"],
            "signature": "0x" + signature.hex(),
            "salt": "0x" + user_salt(world, session_id, key).hex(),
        }
    )


async def _plaintext_login(world: DevWorld, url: str, session_id: int, key: bytes) -> Any:
    """``session_init`` without ``key_share``: the node's answer, and whether it hung up."""
    async with websockets.connect(url) as ws:
        challenge = json.loads(await asyncio.wait_for(ws.recv(), BOUND))
        await ws.send(_init(world, challenge, session_id, key))
        answer = await asyncio.wait_for(ws.recv(), BOUND)
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), BOUND)
        return challenge["plaintext"], json.loads(answer)


def test_a_plaintext_login_is_refused_unless_the_node_allows_it_on_a_dev_chain(
    world: DevWorld, scripted: Backend, start_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_id = serve_model(world, scripted, keccak(text="scripted"))
    session_id, signer = open_session(world, model_id=model_id)
    _node, strict = start_node(scripted)
    offered, answer = asyncio.run(_plaintext_login(world, strict.ws_url, session_id, signer.key))
    assert offered is False
    assert (answer["type"], answer["code"]) == ("error", "ENCRYPTION_REQUIRED")
    assert "key_share" in answer["message"]

    # The setting on a chain that is not a dev chain changes nothing.
    monkeypatch.setattr(world.chain, "is_dev", False)
    _node, public = start_node(scripted, allow_plaintext_sessions=True)
    offered, answer = asyncio.run(_plaintext_login(world, public.ws_url, session_id, signer.key))
    assert offered is False and answer["code"] == "ENCRYPTION_REQUIRED"


def test_plaintext_sessions_work_only_when_both_sides_ask_on_a_dev_chain(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    model_id = serve_model(world, scripted, keccak(text="scripted"))
    plain_id, plain_signer = open_session(world, model_id=model_id)
    sealed_id, sealed_signer = open_session(world, model_id=model_id)
    _node, lenient = start_node(scripted, allow_plaintext_sessions=True)
    _node, strict = start_node(scripted)

    async def run() -> tuple[bool, int, bool, int, str]:
        plain = await SessionClient.connect(
            lenient.ws_url, plain_id, plain_signer.key, expect=expect(world), plaintext=True
        )
        plain_tokens = len((await plain.chat(HELLO, max_tokens=5)).token_ids)
        await plain.close()
        # A client that does not ask gets a sealed session from the same node.
        sealed = await SessionClient.connect(
            lenient.ws_url, sealed_id, sealed_signer.key, expect=expect(world)
        )
        sealed_tokens = len((await sealed.chat(HELLO, max_tokens=5)).token_ids)
        await sealed.close()
        with pytest.raises(SessionError) as refused:
            await SessionClient.connect(
                strict.ws_url, plain_id, plain_signer.key, expect=expect(world), plaintext=True
            )
        return (
            plain.ws.encrypted,
            plain_tokens,
            sealed.ws.encrypted,
            sealed_tokens,
            (refused.value.code),
        )

    plain_sealed, plain_tokens, sealed_sealed, sealed_tokens, code = asyncio.run(
        asyncio.wait_for(run(), 60)
    )
    assert (plain_sealed, plain_tokens) == (False, 5)
    assert (sealed_sealed, sealed_tokens) == (True, 5)
    assert code == "ENCRYPTION_REQUIRED"  # the strict node did not offer it: nothing sent


def test_a_client_refuses_plaintext_sessions_off_dev_chains(
    world: DevWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(world.chain, "is_dev", False)
    with pytest.raises(ConfigurationError, match="dev chains only"):
        Client(
            world.chain,
            key="0x" + dev_account("user").key.hex(),
            deployment=world.contracts.deployment,
            plaintext_sessions=True,
        )


@pytest.mark.parametrize("attack", ["low-order-key", "text-after-key-share"])
def test_a_broken_channel_is_bad_seal_and_the_node_serves_others(
    world: DevWorld, scripted: Backend, start_node: NodeFactory, attack: str
) -> None:
    model_id = serve_model(world, scripted, keccak(text="scripted"))
    session_id, signer = open_session(world, model_id=model_id)
    _node, server = start_node(scripted)

    async def run() -> tuple[str, int]:
        if attack == "low-order-key":
            async with websockets.connect(server.ws_url) as ws:
                await asyncio.wait_for(ws.recv(), BOUND)
                await ws.send(json.dumps({"type": "key_share", "client_key": "0x" + "00" * 32}))
                answer = json.loads(await asyncio.wait_for(ws.recv(), BOUND))
        else:
            sealed, challenge = await open_sealed(server.ws_url)
            await sealed.ws.send(_init(world, challenge, session_id, signer.key))  # not sealed
            answer = json.loads(await asyncio.wait_for(sealed.recv(), BOUND))  # sealed error
            await sealed.close()
        honest = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world)
        )
        tokens = len((await honest.chat(HELLO, max_tokens=5)).token_ids)
        await honest.close()
        return str(answer["code"]), tokens

    code, tokens = asyncio.run(asyncio.wait_for(run(), 60))
    assert code == "BAD_SEAL"
    assert tokens == 5
