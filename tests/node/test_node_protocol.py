"""The session protocol end to end over real WebSockets, with the scripted backend."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_utils import keccak
from node_support import (
    ONE_TOKEN_STEPS,
    WHOLE_STEPS,
    NodeFactory,
    NodeFrames,
    challenge_domain,
    expect,
    generation_steps,
    open_sealed,
    read_session,
    serve_model,
    session_init_frame,
    signed_receipt,
    wait_for_receipt,
    wait_until,
)

from inferledger.chain.devchain import INPUT_PRICE, PRICE, DevWorld
from inferledger.chain.receipts import Receipt, ReceiptDomain, check_receipt_signature
from inferledger.chain.units import cost
from inferledger.inference import Backend
from inferledger.node.metering import Counts
from inferledger.protocol.server import SessionEnd
from inferledger.sdk.sealed import SealedSocket
from inferledger.sdk.wire import History, SessionClient, SessionError
from support import open_session

HELLO = [{"role": "user", "content": "hello"}]


def prompt_tokens(backend: Backend) -> int:
    """What the node bills HELLO as: its chat template's tokens."""
    return len(backend.tokenize_chat(HELLO))


def test_session_streams_and_receipts_every_interval(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    model_id = serve_model(world, scripted, keccak(text="scripted"))
    session_id, signer = open_session(world, model_id=model_id, proof_interval=10)
    node, server = start_node(scripted)

    async def run() -> tuple[int, SessionEnd]:
        client = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world)
        )
        reply = await client.chat(HELLO, max_tokens=35)
        ended = await client.end()
        await client.close()
        return len(reply.token_ids), ended

    count, ended = asyncio.run(run())
    billed = prompt_tokens(scripted)
    assert count == 35
    assert (ended.served_input_tokens, ended.served_output_tokens) == (billed, 35)
    assert (ended.receipted_input_tokens, ended.receipted_output_tokens) == (billed, 35)
    receipts = node.state.receipts(session_id)
    # A receipt at every proof bundle and at the end of the reply, each for the prompt too.
    assert [r.counts for r in receipts] == [Counts(billed, n) for n in (10, 20, 30, 35)]
    checkpoints = node.outbox.checkpoints(session_id)
    assert [(cp.token_start, cp.token_end) for cp in checkpoints] == [
        (0, 10),
        (10, 20),
        (20, 30),
        (30, 35),
    ]
    assert [r.proof_hash for r in receipts] == [cp.proof_hash for cp in checkpoints]
    (request,) = node.state.list_requests(session_id)
    assert (request.request_id, request.completion_tokens) == ("r1", 35)
    assert request.finish_reason == "length" and request.prompt_tokens == billed
    for r in receipts:
        receipt = Receipt(session_id, r.input_tokens, r.tokens, r.proof_hash)
        check_receipt_signature(node.domain, receipt, r.signature, signer.address)


@pytest.mark.parametrize(
    ("steps", "asked_at"),
    [
        (ONE_TOKEN_STEPS, (5, 10, 15, 20, 23)),  # as a model computes: every half window
        (WHOLE_STEPS, (10, 20, 23)),  # all that may be sent at once: once per step
    ],
    ids=["one-token-steps", "whole-steps"],
)
def test_receipts_are_asked_every_half_window_or_once_per_step(
    world: DevWorld,
    scripted: Backend,
    start_node: NodeFactory,
    steps: float,
    asked_at: tuple[int, ...],
) -> None:
    """A receipt is asked at the end of a generation step once half the window was served
    since the last request: a one-token step is the pipelined half window (the client signs
    while the next half streams), a step of many tokens gets one request for all of them."""
    model_id = serve_model(world, scripted, keccak(text="scripted"))
    session_id, signer = open_session(world, model_id=model_id, proof_interval=1000)
    node, server = start_node(scripted, max_unreceipted_tokens=10)

    async def run() -> list[tuple[int, int]]:
        client = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world)
        )
        await client.chat(HELLO, max_tokens=23)
        await client.end()
        await client.close()
        return [(r.input_tokens, r.tokens) for r in client.receipts]

    billed = prompt_tokens(scripted)
    with generation_steps(steps):
        signed = asyncio.run(run())
    # Before the session's first bundle a receipt names the zero proof hash, and the
    # end-of-reply bundle covers all.
    assert signed == [(billed, n) for n in asked_at]
    receipts = node.state.receipts(session_id)
    assert [r.counts for r in receipts] == [Counts(*c) for c in signed]
    assert {r.proof_hash for r in receipts[:-1]} == {bytes(32)}
    (checkpoint,) = node.outbox.checkpoints(session_id)
    assert (checkpoint.token_start, checkpoint.token_end) == (0, 23)
    assert receipts[-1].proof_hash == checkpoint.proof_hash


class RawClient:
    """A hand-driven connection for sending frames a real client never would."""

    def __init__(self, ws: SealedSocket, challenge: dict[str, object]) -> None:
        self.ws = ws
        self.frames = NodeFrames(ws)
        self.challenge = challenge

    @classmethod
    async def open(cls, url: str) -> RawClient:
        return cls(*await open_sealed(url, max_size=2**24))

    async def send(self, frame: object) -> None:
        await self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def next_error(self) -> dict[str, object]:
        while True:
            frame = await self.frames.next(10)
            if frame["type"] == "error":
                return frame

    @property
    def domain(self) -> ReceiptDomain:
        return challenge_domain(self.challenge)

    async def login(
        self, session_id: int, key: bytes, nonce: bytes | None = None
    ) -> dict[str, Any]:
        """Log in to ``session_id`` with ``key`` (over ``nonce``, by default the challenge's);
        the node's answer."""
        await self.send(session_init_frame(self.challenge, session_id, key, nonce))
        return await self.frames.next()

    async def still_alive(self) -> bool:
        await self.send({"type": "ping"})
        return (await self.frames.next(10))["type"] == "pong"


async def _login_error(url: str, session_id: int, key: bytes, nonce: bytes | None = None) -> str:
    raw = await RawClient.open(url)
    error = await raw.login(session_id, key, nonce)
    await raw.ws.close()
    assert error["type"] == "error", error
    return str(error["code"])


def test_bad_input_gets_its_code_while_a_healthy_session_streams(
    world: DevWorld, start_node: NodeFactory
) -> None:
    from inferledger.inference import load_backend

    backend = load_backend("scripted", tokens_per_second=400)
    c = world.contracts
    model_id = serve_model(world, backend, keccak(text="scripted"))
    healthy_id, healthy_signer = open_session(world, model_id=model_id, proof_interval=20)
    victim_id, victim_signer = open_session(world, model_id=model_id, proof_interval=10)
    expired_id, expired_signer = open_session(world, model_id=model_id, duration=60)
    closed_id, closed_signer = open_session(world, model_id=model_id)
    c.marketplace.complete_session(world.host, closed_id, 0, 0, b"\0" * 32, "", b"")
    other_host = world.funded_sender("other-host", 100_000_000)
    c.token.approve(other_host, c.nodes.address, 10_000_000)
    c.nodes.register(other_host, "ws://elsewhere", {model_id: (INPUT_PRICE, PRICE)}, 10_000_000)
    c.token.approve(world.user, c.marketplace.address, 2_000_000)
    foreign_signer = Account.create()
    foreign_id = c.marketplace.create_session(
        world.user,
        host=other_host.address,
        model_id=model_id,
        deposit=2_000_000,
        max_input_price_per_mtok=INPUT_PRICE,
        max_output_price_per_mtok=PRICE,
        max_duration=86400,
        proof_interval=100,
        session_signer=foreign_signer.address,
    )
    world.chain.time_travel(120)
    node, server = start_node(backend, max_frame_bytes=4096)
    url = server.ws_url

    async def healthy() -> int:
        client = await SessionClient.connect(
            url, healthy_id, healthy_signer.key, expect=expect(world)
        )
        reply = await client.chat(HELLO, max_tokens=300)
        await client.end()
        return len(reply.token_ids)

    async def bad_inputs() -> dict[str, str]:
        codes: dict[str, str] = {}
        raw = await RawClient.open(url)
        await raw.send("{not json")
        codes["malformed"] = str((await raw.next_error())["code"])
        await raw.send({"type": "teleport"})
        codes["unknown"] = str((await raw.next_error())["code"])
        await raw.send({"type": "ping", "pad": "x" * 10_000})
        codes["oversized"] = str((await raw.next_error())["code"])
        await raw.send({"type": "prompt", "request_id": "x", "messages": HELLO})
        codes["unauthenticated"] = str((await raw.next_error())["code"])
        assert await raw.still_alive(), "non-fatal errors must keep the connection"
        await raw.ws.close()
        codes["wrong_signer"] = await _login_error(url, victim_id, Account.create().key)
        codes["bad_nonce"] = await _login_error(url, victim_id, victim_signer.key, b"\1" * 32)
        codes["not_found"] = await _login_error(url, 999_999, victim_signer.key)
        codes["other_host"] = await _login_error(url, foreign_id, foreign_signer.key)
        codes["expired"] = await _login_error(url, expired_id, expired_signer.key)
        codes["closed"] = await _login_error(url, closed_id, closed_signer.key)

        victim = await SessionClient.connect(
            url, victim_id, victim_signer.key, expect=expect(world)
        )
        codes["busy"] = await _login_error(url, victim_id, victim_signer.key)
        await victim.chat(HELLO, max_tokens=10)  # receipted at 10
        await asyncio.to_thread(wait_for_receipt, node, victim_id, 10)
        stored = node.state.latest_receipt(victim_id)
        assert stored is not None and stored.tokens == 10 and stored.input_tokens > 0
        replay = {
            "type": "receipt",
            "input_tokens": stored.input_tokens,
            "output_tokens": 10,
            "proof_hash": "0x" + stored.proof_hash.hex(),
            "signature": "0x" + stored.signature.hex(),
        }
        await victim.send(replay)
        codes["replayed"] = str((await RawClient(victim.ws, {}).next_error())["code"])
        await victim.send({**replay, "output_tokens": 15})
        codes["wrong_count"] = str((await RawClient(victim.ws, {}).next_error())["code"])
        return codes

    async def run() -> tuple[int, dict[str, str]]:
        healthy_task = asyncio.create_task(healthy())
        codes = await bad_inputs()
        return await healthy_task, codes

    healthy_tokens, codes = asyncio.run(asyncio.wait_for(run(), 120))
    assert codes == {
        "malformed": "BAD_FRAME",
        "unknown": "UNKNOWN_TYPE",
        "oversized": "FRAME_TOO_LARGE",
        "unauthenticated": "NOT_AUTHENTICATED",
        "wrong_signer": "BAD_SIGNATURE",
        "bad_nonce": "BAD_NONCE",
        "not_found": "SESSION_NOT_FOUND",
        "other_host": "WRONG_HOST",
        "expired": "SESSION_CLOSED",
        "closed": "SESSION_CLOSED",
        "busy": "SESSION_BUSY",
        "replayed": "RECEIPT_UNEXPECTED",
        "wrong_count": "RECEIPT_MISMATCH",
    }
    assert healthy_tokens == 300
    wait_for_receipt(node, healthy_id, 300)
    assert node.state.latest_receipt(healthy_id).tokens == 300


def test_budget_ends_a_reply_and_then_refuses_prompts(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    model_id = serve_model(world, scripted, keccak(text="scripted"))
    billed = prompt_tokens(scripted)
    # Exactly two prompts and 20 reply tokens: 2 * 29 * $0.0005 + 20 * $0.002.
    deposit = cost(2 * billed, 20, INPUT_PRICE, PRICE)
    session_id, signer = open_session(world, model_id=model_id, deposit=deposit, proof_interval=10)
    node, server = start_node(scripted)

    async def run() -> tuple[str, int, str, int, str, SessionEnd]:
        client = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world)
        )
        first = await client.chat(HELLO, max_tokens=5)
        second = await client.chat(HELLO)  # no max_tokens: what the budget allows
        with pytest.raises(SessionError) as refused:
            await client.chat(HELLO)
        ended = await client.end()
        await client.close()
        return (
            first.finish_reason,
            len(second.token_ids),
            second.finish_reason,
            second.cost,
            refused.value.code,
            ended,
        )

    first, second_tokens, second, spent, refused, ended = asyncio.run(run())
    assert (first, second, refused) == ("length", "budget", "BUDGET_EXHAUSTED")
    assert second_tokens == 15 and spent == deposit
    # The refused third prompt was never billed.
    assert (ended.receipted_input_tokens, ended.receipted_output_tokens) == (2 * billed, 20)
    assert (ended.served_input_tokens, ended.served_output_tokens) == (2 * billed, 20)
    record = node.state.get_session(session_id)
    assert record.served == record.receipted == Counts(2 * billed, 20)
    assert [r.prompt_tokens for r in node.state.list_requests(session_id)] == [billed, billed]


def test_invalid_receipt_signature_stops_the_stream(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    model_id = serve_model(world, scripted, keccak(text="scripted"))
    session_id, signer = open_session(world, model_id=model_id, proof_interval=10)
    node, server = start_node(scripted)

    async def run() -> str:
        raw = await RawClient.open(server.ws_url)
        await raw.ws.close()
        client = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world)
        )
        client.signer = Account.create()  # signs with a key that is not the session signer
        with pytest.raises(SessionError) as stopped:
            await client.chat(HELLO, max_tokens=50)
        return stopped.value.code

    assert asyncio.run(run()) == "RECEIPT_INVALID"
    assert node.state.latest_receipt(session_id) is None
    assert node.state.get_session(session_id).receipted == Counts(0, 0)
    # The stream was held at the receipt window, never beyond it.
    assert 0 < node.meters[session_id].served.output <= 32


def test_degraded_node_refuses_paid_sessions_and_says_why(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    import httpx

    session_id, signer = open_session(world)  # the host does not serve the scripted model
    node, server = start_node(scripted)
    health = httpx.get(server.url + "/health")
    assert health.status_code == 503
    assert health.json()["status"] == "degraded"
    assert not node.ready

    async def run() -> str:
        with pytest.raises(SessionError) as refused:
            await SessionClient.connect(server.ws_url, session_id, signer.key, expect=expect(world))
        return refused.value.code

    assert asyncio.run(run()) == "NODE_NOT_READY"


def test_http_endpoints_report_models_sessions_and_metrics(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    import httpx

    model_id = serve_model(
        world, scripted, keccak(text="scripted"), price=3_000_000_000, input_price=700_000_000
    )
    session_id, signer = open_session(
        world,
        model_id=model_id,
        proof_interval=10,
        input_price=700_000_000,
        output_price=3_000_000_000,
    )
    _node, server = start_node(scripted)

    async def run() -> None:
        client = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world)
        )
        await client.chat(HELLO, max_tokens=12)
        await client.end()

    asyncio.run(run())
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    (model,) = httpx.get(server.url + "/v1/models").json()["models"]
    assert model["model_id"] == "0x" + model_id.hex()
    assert (model["input_price_per_mtok"], model["output_price_per_mtok"]) == (
        700_000_000,
        3_000_000_000,
    )
    session = read_session(server.url, world, session_id, signer.key).json()
    billed = prompt_tokens(scripted)
    assert (session["input_tokens_receipted"], session["tokens_receipted"]) == (billed, 12)
    assert (session["input_tokens_served"], session["tokens_generated"]) == (billed, 12)
    assert (session["input_price_per_mtok"], session["output_price_per_mtok"]) == (
        "700000000",
        "3000000000",
    )
    assert [(r["input_tokens"], r["tokens"]) for r in session["receipts"]] == [
        (billed, 10),
        (billed, 12),
    ]
    assert read_session(server.url, world, 424242, signer.key).status_code == 404
    metrics = httpx.get(server.url + "/metrics").text
    assert "inferledger_tokens_generated_total 12.0" in metrics
    assert "inferledger_receipt_round_trip_seconds_count 2.0" in metrics


def test_restarted_node_resumes_a_session_from_its_sqlite_state(
    world: DevWorld, scripted: Backend, start_node: NodeFactory, tmp_path: Path
) -> None:
    """A reply dropped mid-stream, then the node restarted: the new node knows from SQLite
    what was served, replays the tokens after the last receipt, has them receipted before
    any prompt, and bills every token exactly once (docs/protocol.md, Billing)."""
    model_id = serve_model(world, scripted, keccak(text="scripted"))
    session_id, signer = open_session(world, model_id=model_id, proof_interval=10)
    db = tmp_path / "shared.sqlite3"
    first_node, first = start_node(scripted, state_db=db, disconnect_grace=3600)
    billed = prompt_tokens(scripted)

    async def before_restart() -> SessionClient:
        client = await SessionClient.connect(
            first.ws_url, session_id, signer.key, expect=expect(world)
        )
        await client.chat(HELLO, max_tokens=15)  # receipted at 10 and 15
        stream = client.stream(HELLO, max_tokens=100)
        async for token in stream:
            if token.index >= 25:  # receipted at 20; the node streams on meanwhile
                break
        await stream.aclose()
        await client.close()  # dropped mid-reply, without `end`
        return client

    dropped = asyncio.run(before_restart())
    # At least 25: tokens that were ready together came in one frame (a `tokens` frame).
    have = dropped.received
    assert have >= 25 and dropped.receipts[-1].tokens == 20
    wait_until(lambda: session_id not in first_node.live, "the node to see the disconnect")
    left = first_node.state.get_session(session_id)
    served = left.tokens_generated
    assert have <= served <= 20 + 32  # never beyond the window past the last receipt
    assert left.receipted == Counts(2 * billed, 20)
    assert [t.index for t in left.served_tail] == list(range(21, served + 1))
    first.stop()
    first_node.state.close()
    second_node, second = start_node(scripted, state_db=db)

    async def after_restart() -> tuple[SessionClient, SessionEnd]:
        history = History(
            token_ids=tuple(t.token_id for t in dropped.tokens),
            input_tokens=dropped.input_tokens,
            signed=(dropped.receipts[-1].input_tokens, dropped.receipts[-1].tokens),
            reply_open=True,
        )
        client = await SessionClient.connect(
            second.ws_url, session_id, signer.key, expect=expect(world), history=history
        )
        with pytest.raises(SessionError) as owed:  # nothing is served before the receipt
            await client.chat(HELLO, max_tokens=10)
        assert owed.value.code == "RECEIPT_OWED"
        await client.settle_up()
        await client.chat(HELLO, max_tokens=10)
        ended = await client.end()
        await client.close()
        return client, ended

    client, ended = asyncio.run(after_restart())
    ready = client.ready
    assert (ready.receipted_input_tokens, ready.receipted_output_tokens) == (2 * billed, 20)
    assert (ready.served_input_tokens, ready.served_output_tokens) == (2 * billed, served)
    # The replay holds exactly the unreceipted tokens, the ones we had among them unchanged.
    assert [t.index for t in ready.replay] == list(range(21, served + 1))
    assert [t.token_id for t in ready.replay[: have - 20]] == [
        t.token_id for t in dropped.tokens[20:]
    ]
    # New to us: the replayed tokens we had missed, then the new reply; none twice.
    assert [t.index for t in client.tokens] == list(range(have + 1, served + 11))
    assert second_node.metrics.tokens_generated._value.get() == 10  # nothing regenerated
    total = Counts(3 * billed, served + 10)
    assert (ended.receipted_input_tokens, ended.receipted_output_tokens) == (
        total.input,
        total.output,
    )
    assert (ended.served_input_tokens, ended.served_output_tokens) == (total.input, total.output)
    receipts = [r.counts for r in second_node.state.receipts(session_id)]
    assert receipts[:4] == [
        Counts(billed, 10),
        Counts(billed, 15),
        Counts(2 * billed, 20),
        Counts(2 * billed, served),  # the replay, signed before the next prompt
    ]
    assert receipts[-1] == total and receipts == sorted(receipts)
    assert second_node.state.get_session(session_id).served_tail == ()


def test_a_client_that_left_owing_its_last_receipt_is_asked_again_on_resume(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    """The node asked for the whole reply, the client left before signing: on the same
    node, the resumed connection gets that receipt request again, not silence."""
    model_id = serve_model(world, scripted, keccak(text="scripted"))
    session_id, signer = open_session(world, model_id=model_id, proof_interval=1000)
    node, server = start_node(scripted, disconnect_grace=3600)
    billed = prompt_tokens(scripted)

    class Crash(Exception):
        """The client dies before it persists (and sends) the reply's last receipt."""

    def crash_at_the_end(signed: Any) -> None:
        if signed.tokens == 20:
            raise Crash

    async def run() -> tuple[SessionClient, SessionClient]:
        first = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world), on_receipt=crash_at_the_end
        )
        with pytest.raises(Crash):
            await first.chat(HELLO, max_tokens=20)  # receipts at 16, then 20 at the end
        await first.close()
        await asyncio.to_thread(
            wait_until, lambda: session_id not in node.live, "the node to see the disconnect"
        )
        history = History(
            token_ids=tuple(t.token_id for t in first.tokens),
            input_tokens=first.input_tokens,
            signed=(billed, 16),
            reply_open=True,
        )
        again = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world), history=history
        )
        await asyncio.wait_for(again.settle_up(), 20)
        await again.chat(HELLO, max_tokens=5)
        await again.end()
        await again.close()
        return first, again

    with generation_steps(ONE_TOKEN_STEPS):  # receipts at 16, then 20 at the end
        first, again = asyncio.run(run())
    assert [r.tokens for r in first.receipts] == [16]
    assert (again.ready.receipted_output_tokens, again.ready.served_output_tokens) == (16, 20)
    assert [(r.input_tokens, r.tokens) for r in again.receipts] == [
        (billed, 20),
        (2 * billed, 25),
    ]
    assert node.state.get_session(session_id).receipted == Counts(2 * billed, 25)


def test_a_client_leaving_right_after_its_last_receipt_is_no_node_error(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    """The usual goodbye of a script: sign the reply's receipt, read done, close at once.
    The receipt is kept, and the ack the node can no longer deliver is not an INTERNAL."""
    model_id = serve_model(world, scripted, keccak(text="scripted"))
    node, server = start_node(scripted, disconnect_grace=3600)
    sessions = [open_session(world, model_id=model_id, proof_interval=1000) for _ in range(3)]

    async def run() -> None:
        for session_id, signer in sessions:
            client = await SessionClient.connect(
                server.ws_url, session_id, signer.key, expect=expect(world)
            )
            await client.chat(HELLO, max_tokens=5)
            await client.close()

    asyncio.run(run())
    for session_id, _ in sessions:
        wait_until(lambda sid=session_id: sid not in node.live, "the node to see the disconnect")
        assert node.state.get_session(session_id).receipted == Counts(prompt_tokens(scripted), 5)
    assert node.metrics.errors.labels(code="INTERNAL")._value.get() == 0


def _last_index(frame: dict[str, Any]) -> int:
    """The index of a token frame's last token."""
    return int(frame["index"]) + len(frame.get("token_ids", [None])) - 1


def test_frames_ready_together_go_in_one_message(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    """The node's per-receipt cost is its messages: tokens computed together go out in one
    message with one receipt request that covers them all, and the ack of a receipt with
    the tokens the receipt lets out."""
    model_id = serve_model(world, scripted, keccak(text="scripted"))
    session_id, signer = open_session(world, model_id=model_id, proof_interval=1000)
    _node, server = start_node(scripted, max_unreceipted_tokens=32)  # a request every 16

    async def messages_until(raw: RawClient, output_tokens: int) -> list[list[dict[str, Any]]]:
        seen: list[list[dict[str, Any]]] = []
        while not any(
            f["type"] == "receipt_request" and f["output_tokens"] == output_tokens
            for f in (seen[-1] if seen else [])
        ):
            message = json.loads(await asyncio.wait_for(raw.ws.recv(), 20))
            seen.append(message if isinstance(message, list) else [message])
        return seen

    async def run() -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]]]:
        raw = await RawClient.open(server.ws_url)
        assert (await raw.login(session_id, signer.key))["type"] == "session_ready"
        await raw.send({"type": "prompt", "request_id": "a", "messages": HELLO, "max_tokens": 60})
        # Not signing: the node streams the 32 tokens of its first step, asks for them all
        # at once, and pauses.
        before = await messages_until(raw, 32)
        (request,) = [f for f in before[-1] if f["type"] == "receipt_request"]
        await raw.send(signed_receipt(request, session_id, signer.key, raw.domain))
        message = json.loads(await asyncio.wait_for(raw.ws.recv(), 20))
        assert isinstance(message, list), message  # several frames: a JSON array
        after: list[dict[str, Any]] = message

        def final_ack(f: dict[str, Any]) -> bool:
            return f["type"] == "receipt_ack" and f["output_tokens"] == 60

        while not (any(f["type"] == "done" for f in after) and any(map(final_ack, after))):
            frame = await raw.frames.next()
            if frame["type"] == "receipt_request":
                await raw.send(signed_receipt(frame, session_id, signer.key, raw.domain))
            after.append(frame)
        await raw.ws.close()
        return before, after

    with generation_steps(WHOLE_STEPS):
        before, after = asyncio.run(asyncio.wait_for(run(), 60))
    # One message: the reply's start, its first 32 tokens, and the request for them last.
    (message,) = before
    assert message[0]["type"] == "reply_start"
    assert message[1]["type"] in ("token", "tokens") and message[1]["index"] == 1
    assert message[-1]["type"] == "receipt_request" and message[-1]["output_tokens"] == 32
    assert [f["type"] for f in message[1:-1]] == ["tokens"]
    assert _last_index(message[-2]) == 32
    # The signed receipt's ack and the tokens it let out, in the one message that followed.
    assert after[0]["type"] == "receipt_ack" and after[0]["output_tokens"] == 32
    assert after[1]["type"] in ("token", "tokens") and after[1]["index"] == 33
    (done,) = [f for f in after if f["type"] == "done"]
    assert done["completion_tokens"] == 60


def test_prompts_are_refused_while_streaming_while_owing_and_after_end(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    """REQUEST_IN_PROGRESS, RECEIPT_OWED and SESSION_CLOSING over the wire, from a hand-driven
    client that signs exactly when it chooses to."""
    model_id = serve_model(world, scripted, keccak(text="scripted"))
    session_id, signer = open_session(world, model_id=model_id, proof_interval=1000)
    _node, server = start_node(scripted)
    domain = world.contracts.marketplace.domain()
    prompt = {"type": "prompt", "messages": HELLO, "max_tokens": 100}

    def receipt_for(request: dict[str, Any]) -> dict[str, Any]:
        return signed_receipt(request, session_id, signer.key, domain)

    async def run() -> tuple[list[str], dict[str, Any], dict[str, Any]]:
        raw = await RawClient.open(server.ws_url)
        assert (await raw.login(session_id, signer.key))["type"] == "session_ready"
        codes = []
        # 100 tokens cannot stream past the 32-token window without our receipts.
        await raw.send({**prompt, "request_id": "a"})
        await raw.send({**prompt, "request_id": "b"})
        held = None
        while True:
            frame = await raw.frames.next()
            if frame["type"] == "error":
                codes.append(frame["code"])
            elif frame["type"] == "receipt_request" and frame["output_tokens"] < 100:
                await raw.send(receipt_for(frame))
            elif frame["type"] == "receipt_request":
                held = frame  # the reply's last receipt: not signed yet
            elif frame["type"] == "done":
                break
        assert held is not None
        await raw.send({**prompt, "request_id": "c"})
        codes.append(str((await raw.next_error())["code"]))
        await raw.send(receipt_for(held))
        ack = await raw.frames.next()
        assert ack["type"] == "receipt_ack", ack
        await raw.send({"type": "end"})
        await raw.send({**prompt, "request_id": "d"})
        frames = []
        while not frames or frames[-1]["type"] not in ("settled", "settlement_pending"):
            frames.append(await raw.frames.next(30))
        codes += [f["code"] for f in frames if f["type"] == "error"]
        await raw.ws.close()
        return codes, ack, frames[-1]

    codes, ack, settled = asyncio.run(run())
    billed = prompt_tokens(scripted)
    assert codes == ["REQUEST_IN_PROGRESS", "RECEIPT_OWED", "SESSION_CLOSING"]
    assert (ack["input_tokens"], ack["output_tokens"]) == (billed, 100)
    assert settled["type"] == "settled"
    assert (settled["input_tokens"], settled["output_tokens"]) == (billed, 100)
    info = world.contracts.marketplace.get_session(session_id)
    assert (info.input_tokens_paid, info.output_tokens_paid) == (billed, 100)
