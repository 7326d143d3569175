"""The client refuses to sign for tokens it did not receive.

A real node never asks for such receipts, so a small hand-written node plays the
dishonest host here: it sends tokens, then asks for a receipt with a wrong count or a
wrong transcript hash, or claims receipted tokens the client never saw.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
import websockets
from eth_account import Account

from inferledger.proofs.transcript import TranscriptHash
from inferledger.sdk.wire import SessionClient, SessionError, http_base, ws_endpoint

SESSION = 7
TOKENS = [300, 301, 302]


def transcript_hex(token_ids: list[int]) -> str:
    transcript = TranscriptHash(SESSION)
    for token_id in token_ids:
        transcript.update(token_id)
    return "0x" + transcript.value.hex()


async def dishonest_node(
    request: Callable[[list[int]], dict[str, Any]], receipted: list[int] | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """Serve one login and one prompt; return what the client answered."""
    answers: list[dict[str, Any]] = []

    async def handler(ws: Any) -> None:
        await ws.send(
            json.dumps(
                {
                    "type": "challenge",
                    "nonce": "0x" + "11" * 32,
                    "host": Account.create().address,
                    "chain_id": 31337,
                    "marketplace": Account.create().address,
                }
            )
        )
        await ws.recv()  # session_init
        held = receipted or []
        await ws.send(
            json.dumps(
                {
                    "type": "session_ready",
                    "price_per_mtok": 1,
                    "tokens_receipted": len(held),
                    "transcript_hash": transcript_hex(held),
                }
            )
        )
        await ws.recv()  # prompt
        for index, token_id in enumerate(TOKENS, 1):
            frame = {"type": "token", "index": index, "token_id": token_id, "text": "x"}
            await ws.send(json.dumps(frame))
        await ws.send(json.dumps({"type": "receipt_request", **request(TOKENS)}))
        await ws.send(
            json.dumps(
                {"type": "done", "finish_reason": "stop", "prompt_tokens": 1, "session_tokens": 3}
            )
        )
        async for message in ws:
            answers.append(json.loads(message))

    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        url = f"ws://127.0.0.1:{port}/v1/ws"
        client = await SessionClient.connect(url, SESSION, Account.create().key)
        try:
            await client.chat([{"role": "user", "content": "hi"}])
        except SessionError as refused:
            await client.close()
            await asyncio.sleep(0.05)
            return refused.code, answers
        await client.close()
        await asyncio.sleep(0.05)
        return "signed", answers


def receipt_request(tokens: int, token_ids: list[int]) -> dict[str, Any]:
    return {
        "session_id": SESSION,
        "tokens": tokens,
        "proof_hash": "0x" + "ab" * 32,
        "transcript_hash": transcript_hex(token_ids),
        "proof_uri": "/v1/proofs/0x" + "ab" * 32,
    }


def test_an_honest_request_is_signed() -> None:
    code, answers = asyncio.run(dishonest_node(lambda ids: receipt_request(3, ids)))
    assert code == "signed"
    assert [a["type"] for a in answers] == ["receipt"] and answers[0]["tokens"] == 3


@pytest.mark.parametrize(
    "request_for",
    [
        lambda ids: receipt_request(4, ids),  # more tokens than were sent
        lambda ids: receipt_request(3, [*ids[:2], 999]),  # another transcript
    ],
    ids=["count", "transcript"],
)
def test_a_dishonest_request_is_refused_and_nothing_is_signed(
    request_for: Callable[[list[int]], dict[str, Any]],
) -> None:
    code, answers = asyncio.run(dishonest_node(request_for))
    assert code == "RECEIPT_REFUSED"
    assert answers == []


def test_a_node_claiming_unseen_tokens_is_refused_at_login() -> None:
    async def run() -> str:
        with pytest.raises(SessionError) as refused:
            await asyncio.wait_for(
                dishonest_node(lambda ids: receipt_request(3, ids), receipted=[5, 6]), 10
            )
        return refused.value.code

    assert asyncio.run(run()) == "TRANSCRIPT_MISMATCH"


def test_node_urls() -> None:
    assert ws_endpoint("http://10.0.0.1:8080") == "ws://10.0.0.1:8080/v1/ws"
    assert ws_endpoint("https://node.example.com/") == "wss://node.example.com/v1/ws"
    assert ws_endpoint("ws://h:1/v1/ws") == "ws://h:1/v1/ws"
    assert http_base("wss://node.example.com/v1/ws") == "https://node.example.com"
    with pytest.raises(ValueError):
        ws_endpoint("ftp://nope")
