"""Billing integrity against hostile users, over real WebSockets, on both chains.

Each test is an attack from docs/architecture.md's threat model, and asserts what the
attacker gets: at most ``max_unreceipted_tokens`` unpaid reply tokens (and one prompt)
per session however often it reconnects, nothing after a settlement starts, one live
connection per session, and prompt tokens billed at the input price.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from eth_account import Account
from eth_utils import keccak
from node_support import (
    NodeFactory,
    NodeFrames,
    expect,
    open_sealed,
    serve_model,
    session_init_frame,
    wait_until,
)

from inferledger.chain.devchain import INPUT_PRICE, PRICE, DevWorld
from inferledger.chain.units import settlement_split, usdc
from inferledger.inference import Backend
from inferledger.node.metering import Phase
from inferledger.sdk.wire import SessionClient
from support import open_session

HELLO = [{"role": "user", "content": "hello"}]
CAP = 8  # max_unreceipted_tokens for these tests


async def login(url: str, session_id: int, key: bytes) -> tuple[NodeFrames, dict[str, Any]]:
    """A raw connection logged in to ``session_id``: (its frames, the answer to session_init)."""
    ws, challenge = await open_sealed(url, max_size=2**22)
    await ws.send(json.dumps(session_init_frame(challenge, session_id, key)))
    frames = NodeFrames(ws)
    return frames, await frames.next()


def as_token_frames(frame: dict[str, Any]) -> list[dict[str, Any]]:
    """A frame, with a ``tokens`` frame (several tokens) as the ``token`` frames it stands for."""
    if frame["type"] != "tokens":
        return [frame]
    pairs = zip(frame["token_ids"], frame["texts"], strict=True)
    return [
        {"type": "token", "request_id": frame["request_id"], "index": frame["index"] + i}
        | {"token_id": token_id, "text": text}
        for i, (token_id, text) in enumerate(pairs)
    ]


async def frames_until(frames: NodeFrames, kind: str) -> list[dict[str, Any]]:
    """Every frame up to and including the first of ``kind`` (bounded in time); a ``tokens``
    frame is counted as its ``token`` frames."""
    seen = []
    while True:
        frames_read = as_token_frames(await frames.next())
        seen.extend(frames_read)
        if any(frame["type"] == kind for frame in frames_read):
            return seen


def test_a_user_who_never_signs_gets_at_most_the_cap_over_any_number_of_reconnects(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    model_id = serve_model(world, scripted, keccak(text="scripted"))
    session_id, signer = open_session(world, model_id=model_id, proof_interval=1000)
    node, server = start_node(
        scripted, max_unreceipted_tokens=CAP, max_unpaid_resumes=2, disconnect_grace=3600
    )

    async def attack() -> tuple[set[int], list[str]]:
        new_tokens: set[int] = set()  # distinct token indices ever received
        codes = []
        for _ in range(3):
            conn, ready = await login(server.ws_url, session_id, signer.key)
            assert ready["type"] == "session_ready"
            new_tokens |= {t["index"] for t in ready["replay"]}
            await conn.send(
                json.dumps(
                    {"type": "prompt", "request_id": "x", "messages": HELLO, "max_tokens": 500}
                )
            )
            # Held owing a receipt: the node asks for one (mid-reply, or again on resume)
            # before anything is unpaid; only then is the ping's pong a fair cut-off.
            frames = await frames_until(conn, "receipt_request")
            await conn.send(json.dumps({"type": "ping"}))
            for frame in frames + await frames_until(conn, "pong"):
                if frame["type"] == "token":
                    new_tokens.add(frame["index"])
                if frame["type"] == "error":
                    codes.append(frame["code"])
            # The stream is held at the cap: a second ping is answered, no token comes.
            await conn.send(json.dumps({"type": "ping"}))
            later = await frames_until(conn, "pong")
            new_tokens |= {f["index"] for f in later if f["type"] == "token"}
            await conn.close()
            wait_until(lambda: session_id not in node.live, "the node to see the disconnect")
        conn, refused = await login(server.ws_url, session_id, signer.key)
        codes.append(refused.get("code", refused["type"]))
        await conn.close()
        return new_tokens, codes

    received, codes = asyncio.run(attack())
    assert len(received) <= CAP
    assert codes[-1] == "SESSION_CLOSED"  # left owing too often: settled at what was signed
    assert "RECEIPT_OWED" in codes  # a new prompt before signing is refused
    market = world.contracts.marketplace
    wait_until(lambda: market.get_session(session_id).is_settled, "the settlement")
    info = market.get_session(session_id)
    assert (info.input_tokens_paid, info.output_tokens_paid) == (0, 0)
    assert node.meters[session_id].served.output <= CAP


def test_nothing_streams_after_a_close_request_and_the_last_receipt_is_paid(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    model_id = serve_model(world, scripted, keccak(text="scripted"))
    session_id, signer = open_session(world, model_id=model_id, proof_interval=1000)
    node, server = start_node(scripted, max_unreceipted_tokens=CAP, chain_poll_interval=0.2)
    market = world.contracts.marketplace

    async def run() -> tuple[int, str, Any]:
        client = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world)
        )
        got = 0
        async for _token in client.stream(HELLO, max_tokens=1000):
            got += 1
            if got == 20:
                # Stop reading: the node fills its window and waits for our receipt.
                await asyncio.to_thread(market.request_close, world.user, session_id)
                await asyncio.to_thread(
                    wait_until,
                    lambda: node.meters[session_id].phase is not Phase.STREAMING,
                    "the node to stop the session",
                )
        assert client.last_done is not None
        await client.wait_session_end()
        settled = await client.wait_settlement(30)
        await client.close()
        return client.received, client.last_done.finish_reason, settled

    received, reason, settled = asyncio.run(run())
    assert reason == "closing"
    assert received <= 20 + CAP  # what was in the window when the close was seen
    assert settled is not None and settled.type == "settled"
    info = market.get_session(session_id)
    assert info.output_tokens_paid == received  # the final receipt covered every token sent
    assert node.meters[session_id].served.output == received


def test_two_logins_at_once_get_one_session(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    model_id = serve_model(world, scripted, keccak(text="scripted"))
    sessions = [open_session(world, model_id=model_id) for _ in range(4)]
    _node, server = start_node(scripted)

    async def race(session_id: int, key: bytes) -> list[str]:
        results = await asyncio.gather(
            login(server.ws_url, session_id, key), login(server.ws_url, session_id, key)
        )
        kinds = sorted(r[1].get("code", r[1]["type"]) for r in results)
        for conn, _ in results:
            await conn.close()
        return kinds

    async def run() -> list[list[str]]:
        return [await race(sid, signer.key) for sid, signer in sessions]

    for kinds in asyncio.run(run()):
        assert kinds == ["SESSION_BUSY", "session_ready"]


def test_a_long_prompt_costs_its_input_price(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    model_id = serve_model(world, scripted, keccak(text="scripted"))
    session_id, signer = open_session(world, model_id=model_id, deposit=usdc("5"))
    _node, server = start_node(scripted)
    prompt = [{"role": "user", "content": "ledger " * 400}]

    async def run() -> tuple[int, int, Any]:
        client = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world)
        )
        reply = await client.chat(prompt, max_tokens=1)
        await client.end()
        settled = await client.wait_settlement(30)
        await client.close()
        return reply.prompt_tokens, len(reply.token_ids), settled

    prompt_tokens, output, settled = asyncio.run(run())
    assert prompt_tokens == len(scripted.tokenize_chat(prompt)) > 400
    info = world.contracts.marketplace.get_session(session_id)
    assert (info.input_tokens_paid, info.output_tokens_paid) == (prompt_tokens, output)
    split = settlement_split(info.deposit, prompt_tokens, output, INPUT_PRICE, PRICE, info.fee_bps)
    assert settled is not None and (settled.host_amount, settled.fee, settled.refund) == (
        split.host,
        split.fee,
        split.refund,
    )
    assert split.gross > output * PRICE // 1_000_000  # the prompt was paid for


def test_a_two_minute_session_serves_more_than_one_prompt(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    model_id = serve_model(world, scripted, keccak(text="scripted"))
    session_id, signer = open_session(world, model_id=model_id, duration=120)
    _node, server = start_node(scripted, chain_poll_interval=0.2)

    async def run() -> list[str]:
        client = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world)
        )
        reasons = []
        for _ in range(3):
            await client.chat(HELLO, max_tokens=5)
            assert client.last_done is not None
            reasons.append(client.last_done.finish_reason)
            await asyncio.sleep(0.5)  # the chain watcher polls meanwhile; it must not settle
        await client.close()
        return reasons

    assert asyncio.run(run()) == ["length", "length", "length"]
    assert world.contracts.marketplace.get_session(session_id).is_open


def test_a_stranger_cannot_log_in_to_a_session(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    model_id = serve_model(world, scripted, keccak(text="scripted"))
    session_id, _signer = open_session(world, model_id=model_id)
    node, server = start_node(scripted)

    async def run() -> str:
        conn, answer = await login(server.ws_url, session_id, Account.create().key)
        await conn.close()
        return str(answer.get("code"))

    assert asyncio.run(run()) == "BAD_SIGNATURE"
    assert session_id not in node.live


def test_a_login_that_fails_after_reserving_gives_the_session_back(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    model_id = serve_model(world, scripted, keccak(text="scripted"))
    session_id, signer = open_session(world, model_id=model_id)
    node, server = start_node(scripted)
    real = node.state.upsert_session
    failures = []

    def fail_once(record: Any) -> Any:
        if not failures:
            failures.append(record.session_id)
            raise OSError("disk full")
        return real(record)

    node.state.upsert_session = fail_once  # type: ignore[method-assign]

    async def run() -> list[str]:
        answers = []
        for _ in range(2):
            conn, answer = await login(server.ws_url, session_id, signer.key)
            answers.append(str(answer.get("code", answer["type"])))
            await conn.close()
            wait_until(lambda: session_id not in node.live, "the slot to be released")
        return answers

    assert asyncio.run(run()) == ["INTERNAL", "session_ready"]
    assert failures == [session_id]
