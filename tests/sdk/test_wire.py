"""The client signs only what it verified itself.

A real node never lies, so a small hand-written node plays the hostile host here: it
names another chain, marketplace or host in its challenge, claims receipts or served
tokens the client never saw, bills a prompt for more tokens than it could hold, or asks
for a receipt with a wrong count or transcript. Each lie is refused and nothing is signed.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
import websockets
from eth_account import Account

from inferledger.chain.receipts import ReceiptDomain
from inferledger.proofs.transcript import TranscriptHash
from inferledger.protocol.client import prompt_token_bound
from inferledger.sdk.wire import (
    Expectation,
    History,
    SessionClient,
    SessionError,
    http_base,
    ws_endpoint,
)
from sealed_host import HostEnd

SESSION = 7
TOKENS = [300, 301, 302]
HI = [{"role": "user", "content": "hi"}]
HOST_KEY = Account.create()
HOST = HOST_KEY.address
DOMAIN = ReceiptDomain(31337, Account.create().address)
EXPECT = Expectation(DOMAIN, HOST)


def transcript_hex(token_ids: list[int]) -> str:
    transcript = TranscriptHash(SESSION)
    for token_id in token_ids:
        transcript.update(token_id)
    return "0x" + transcript.value.hex()


@dataclass
class Lies:
    """What the hand-written node says; the defaults are the truth."""

    chain_id: int = DOMAIN.chain_id
    marketplace: str = DOMAIN.marketplace
    host: str = HOST
    challenge_signer: Any = HOST_KEY  # who signs the challenge
    receipted: tuple[int, int] = (0, 0)
    served: tuple[int, int] = (0, 0)
    replay: list[int] = field(default_factory=list)
    prompt_tokens: int = 5
    request_input: int | None = None  # default: what reply_start said
    request_output: int = len(TOKENS)
    request_ids: list[int] = field(default_factory=lambda: list(TOKENS))
    asked_max_tokens: int | None = None  # what the client asks; the node sends 3 regardless
    batched: bool = False  # the reply's frames in one message (a JSON array), as a node may


def ready_frame(lies: Lies, transcript_ids: list[int]) -> str:
    return json.dumps(
        {
            "type": "session_ready",
            "session_id": SESSION,
            "model": "m",
            "deposit": 10**6,
            "input_price_per_mtok": 1,
            "output_price_per_mtok": 1,
            "proof_interval": 10,
            "max_unreceipted_tokens": 32,
            "receipted_input_tokens": lies.receipted[0],
            "receipted_output_tokens": lies.receipted[1],
            "served_input_tokens": lies.served[0],
            "served_output_tokens": lies.served[1],
            "transcript_hash": transcript_hex(transcript_ids),
            "replay": [
                {"index": lies.receipted[1] + i + 1, "token_id": t, "text": "x"}
                for i, t in enumerate(lies.replay)
            ],
            "expires_at": 2**40,
            "settles_at": 2**40,
        }
    )


async def hostile_node(lies: Lies) -> tuple[str, list[dict[str, Any]]]:
    """Serve one login and one prompt; the outcome and what the client sent after login."""
    answers: list[dict[str, Any]] = []

    async def handler(socket: Any) -> None:
        ws = HostEnd(socket, lies.challenge_signer, ReceiptDomain(lies.chain_id, lies.marketplace))
        await ws.start(host=lies.host)
        await ws.recv()  # session_init
        await ws.send(ready_frame(lies, list(range(lies.receipted[1]))))
        await ws.recv()  # prompt
        start = {"type": "reply_start", "request_id": "r1", "prompt_tokens": lies.prompt_tokens}
        reply: list[dict[str, Any]] = [{**start, "input_tokens": lies.prompt_tokens}]
        for index, token_id in enumerate(TOKENS, 1):
            frame = {
                "type": "token",
                "request_id": "r1",
                "index": index,
                "token_id": token_id,
                "text": "x",
            }
            reply.append(frame)
        request = {
            "type": "receipt_request",
            "session_id": SESSION,
            "input_tokens": (
                lies.prompt_tokens if lies.request_input is None else lies.request_input
            ),
            "output_tokens": lies.request_output,
            "proof_hash": "0x" + "ab" * 32,
            "transcript_hash": transcript_hex(lies.request_ids),
            "proof_uri": None,
        }
        done = {
            "type": "done",
            "request_id": "r1",
            "finish_reason": "stop",
            "prompt_tokens": lies.prompt_tokens,
            "completion_tokens": 3,
            "input_tokens": lies.prompt_tokens,
            "output_tokens": 3,
        }
        reply += [request, done]
        for message in [reply] if lies.batched else reply:
            await ws.send(json.dumps(message))
        answers.extend(await ws.frames())

    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        url = f"ws://127.0.0.1:{port}/v1/ws"
        try:
            client = await SessionClient.connect(url, SESSION, Account.create().key, expect=EXPECT)
        except SessionError as refused:
            return refused.code, answers
        try:
            if lies.asked_max_tokens is None:
                await client.chat(HI)
            else:
                await client.chat(HI, max_tokens=lies.asked_max_tokens)
        except SessionError as refused:
            await client.close()
            await asyncio.sleep(0.05)
            return refused.code, answers
        await client.close()
        await asyncio.sleep(0.05)
        return "signed", answers


def outcome(lies: Lies) -> tuple[str, list[dict[str, Any]]]:
    return asyncio.run(asyncio.wait_for(hostile_node(lies), 10))


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("asked", [None, 3])  # 3: exactly the tokens the node sends
def test_an_honest_node_gets_its_receipt(asked: int | None, batched: bool) -> None:
    code, answers = outcome(Lies(asked_max_tokens=asked, batched=batched))
    assert code == "signed"
    (receipt,) = answers
    assert (receipt["type"], receipt["input_tokens"], receipt["output_tokens"]) == (
        "receipt",
        5,
        3,
    )


@pytest.mark.parametrize(
    ("lies", "code"),
    [
        (Lies(request_output=4), "RECEIPT_REFUSED"),  # more tokens than were sent
        (Lies(request_output=4, batched=True), "RECEIPT_REFUSED"),  # the same, in one message
        (Lies(request_ids=[300, 301, 999]), "RECEIPT_REFUSED"),  # another transcript
        (Lies(request_input=50), "RECEIPT_REFUSED"),  # input beyond what reply_start said
        (Lies(prompt_tokens=prompt_token_bound(HI) + 1), "RECEIPT_REFUSED"),  # prompt too big
        (Lies(chain_id=1), "WRONG_DOMAIN"),
        (Lies(marketplace=Account.create().address), "WRONG_DOMAIN"),
        (Lies(host=Account.create().address), "WRONG_HOST"),
        # the right host named, but the challenge signed by someone else: an impostor
        (Lies(challenge_signer=Account.create()), "BAD_HOST_SIGNATURE"),
        # a fresh session the node says is mostly receipted already (to sign 1000 for 10)
        (Lies(receipted=(0, 990), served=(0, 990)), "TRANSCRIPT_MISMATCH"),
        # a fresh session the node says it has served tokens of, replayed for signing
        (Lies(served=(0, 2), replay=[1, 2]), "RECEIPT_REFUSED"),
        # prompt tokens billed before we sent any prompt
        (Lies(served=(40, 0)), "RECEIPT_REFUSED"),
        # more tokens than the user asked for, to be signed for
        (Lies(asked_max_tokens=2), "RECEIPT_REFUSED"),
    ],
    ids=[
        "count",
        "count-batched",
        "transcript",
        "input-count",
        "prompt-bound",
        "chain",
        "marketplace",
        "host",
        "impostor",
        "inflated-receipted",
        "unseen-served",
        "unseen-input",
        "beyond-max-tokens",
    ],
)
def test_each_lie_is_refused_and_nothing_is_signed(lies: Lies, code: str) -> None:
    refused, answers = outcome(lies)
    assert refused == code
    assert answers == []


def test_a_resumed_session_learns_the_replayed_tail_of_an_open_reply() -> None:
    async def run() -> tuple[SessionClient, list[dict[str, Any]]]:
        answers: list[dict[str, Any]] = []

        resumed = Lies(receipted=(5, 1), served=(5, 3), replay=TOKENS[1:])

        async def handler(socket: Any) -> None:
            ws = HostEnd(socket, HOST_KEY, DOMAIN)
            await ws.start()
            await ws.recv()
            await ws.send(ready_frame(resumed, TOKENS[:1]))
            await ws.send(
                json.dumps(
                    {
                        "type": "receipt_request",
                        "session_id": SESSION,
                        "input_tokens": 5,
                        "output_tokens": 3,
                        "proof_hash": "0x" + "cd" * 32,
                        "transcript_hash": transcript_hex(TOKENS),
                        "proof_uri": None,
                    }
                )
            )
            answer = json.loads(await ws.recv())
            answers.append(answer)
            await ws.send(
                json.dumps({"type": "receipt_ack", "input_tokens": 5, "output_tokens": 3})
            )
            await socket.wait_closed()

        async with websockets.serve(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            # We had token 1 and the first of the replay, signed 5/1, and the reply was open.
            history = History(
                token_ids=tuple(TOKENS[:2]), input_tokens=5, signed=(5, 1), reply_open=True
            )
            client = await SessionClient.connect(
                f"ws://127.0.0.1:{port}/v1/ws",
                SESSION,
                Account.create().key,
                expect=EXPECT,
                history=history,
            )
            await client.settle_up()
            await client.close()
            return client, answers

    client, answers = asyncio.run(asyncio.wait_for(run(), 10))
    assert [t.token_id for t in client.tokens] == TOKENS[2:]  # only what we lacked is new
    assert client.received == 3
    assert [(a["input_tokens"], a["output_tokens"]) for a in answers] == [(5, 3)]


def pending(reason: str) -> dict[str, Any]:
    return {"type": "settlement_pending", "session_id": SESSION, "reason": reason}


SETTLED = {
    "type": "settled",
    "session_id": SESSION,
    "input_tokens": 0,
    "output_tokens": 0,
    "host_amount": 0,
    "fee": 0,
    "refund": 10**6,
    "refund_credited": False,
    "tx_hash": "0x" + "ee" * 32,
}


@pytest.mark.parametrize(
    ("after_end", "then_close", "final", "heard"),
    [
        # progress, then the outcome on the same connection
        ([pending("chain unreachable"), SETTLED], False, "settled", ["chain unreachable"]),
        # progress, then the node gives up: no need to wait out the timeout
        (
            [pending("chain unreachable"), pending("the node could not settle: no gas")],
            False,
            "the node could not settle: no gas",
            ["chain unreachable", "the node could not settle: no gas"],
        ),
        # progress, then the node hangs up: its last word is all there is
        ([pending("chain unreachable")], True, "chain unreachable", ["chain unreachable"]),
    ],
    ids=["settled", "gave-up", "hung-up"],
)
def test_wait_settlement_reads_through_pending_to_the_nodes_final_word(
    after_end: list[dict[str, Any]], then_close: bool, final: str, heard: list[str]
) -> None:
    """settlement_pending is progress: the wait goes on (reporting each one) until the
    node's ``settled``, its give-up or its hang-up, well before the timeout."""
    seen: list[str] = []

    async def run() -> Any:
        async def handler(socket: Any) -> None:
            ws = HostEnd(socket, HOST_KEY, DOMAIN)
            await ws.start()
            await ws.recv()  # session_init
            await ws.send(ready_frame(Lies(), []))
            await ws.recv()  # end
            end = {
                "type": "session_end",
                "session_id": SESSION,
                "served_input_tokens": 0,
                "served_output_tokens": 0,
                "receipted_input_tokens": 0,
                "receipted_output_tokens": 0,
            }
            for frame in [end, *after_end]:
                await ws.send(json.dumps(frame))
            if not then_close:
                await socket.wait_closed()  # the connection stays open: the client must decide

        async with websockets.serve(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            url = f"ws://127.0.0.1:{port}/v1/ws"
            client = await SessionClient.connect(url, SESSION, Account.create().key, expect=EXPECT)
            await client.end()
            word = await client.wait_settlement(60, on_pending=lambda f: seen.append(f.reason))
            await client.close()
            return word

    word = asyncio.run(asyncio.wait_for(run(), 20))  # far below the 60 s timeout
    assert (word.type if final == "settled" else word.reason) == final
    assert seen == heard


def test_node_urls() -> None:
    assert ws_endpoint("http://10.0.0.1:8080") == "ws://10.0.0.1:8080/v1/ws"
    assert ws_endpoint("https://node.example.com/") == "wss://node.example.com/v1/ws"
    assert ws_endpoint("ws://h:1/v1/ws") == "ws://h:1/v1/ws"
    assert http_base("wss://node.example.com/v1/ws") == "https://node.example.com"
    with pytest.raises(ValueError):
        ws_endpoint("ftp://nope")
