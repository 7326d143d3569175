"""The session protocol end to end over real WebSockets, with the scripted backend."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets
from eth_account import Account
from eth_utils import keccak
from node_support import NodeFactory, expect, serve_model, wait_for_receipt

from inferledger.chain.devchain import DevWorld
from inferledger.chain.receipts import Receipt, check_receipt_signature
from inferledger.inference import Backend
from inferledger.sdk.wire import SessionClient, SessionError
from support import open_session

HELLO = [{"role": "user", "content": "hello"}]


def test_session_streams_and_receipts_every_interval(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    model_id = serve_model(world, scripted, keccak(text="scripted"))
    session_id, signer = open_session(world, model_id=model_id, proof_interval=10)
    node, server = start_node(scripted)

    async def run() -> tuple[int, dict[str, object]]:
        client = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world)
        )
        reply = await client.chat(HELLO, max_tokens=35)
        ended = await client.end()
        return len(reply.token_ids), ended

    count, ended = asyncio.run(run())
    assert count == 35
    assert ended["tokens_receipted"] == 35
    receipts = node.state.receipts(session_id)
    assert [r.tokens for r in receipts] == [10, 20, 30, 35]
    (request,) = node.state.list_requests(session_id)
    assert (request.request_id, request.completion_tokens) == ("r1", 35)
    assert request.finish_reason == "length" and request.prompt_tokens > 0
    for r in receipts:
        check_receipt_signature(
            node.domain, Receipt(session_id, r.tokens, r.proof_hash), r.signature, signer.address
        )


class RawClient:
    """A hand-driven connection for sending frames a real client never would."""

    def __init__(self, ws: websockets.ClientConnection, challenge: dict[str, object]) -> None:
        self.ws = ws
        self.challenge = challenge

    @classmethod
    async def open(cls, url: str) -> RawClient:
        ws = await websockets.connect(url, max_size=2**24)
        return cls(ws, json.loads(await ws.recv()))

    async def send(self, frame: object) -> None:
        await self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def next_error(self) -> dict[str, object]:
        while True:
            frame = json.loads(await asyncio.wait_for(self.ws.recv(), 10))
            if frame["type"] == "error":
                return frame

    async def still_alive(self) -> bool:
        await self.send({"type": "ping"})
        return json.loads(await asyncio.wait_for(self.ws.recv(), 10))["type"] == "pong"


async def _login_error(url: str, session_id: int, key: bytes, nonce: bytes | None = None) -> str:
    from inferledger.chain.receipts import ReceiptDomain, SessionAuth, sign_session_auth

    raw = await RawClient.open(url)
    challenge = raw.challenge
    domain = ReceiptDomain(int(challenge["chain_id"]), str(challenge["marketplace"]))
    real_nonce = bytes.fromhex(str(challenge["nonce"])[2:])
    signed_nonce = nonce or real_nonce
    signature = sign_session_auth(
        key, domain, SessionAuth(session_id, signed_nonce, str(challenge["host"]))
    )
    await raw.send(
        {
            "type": "session_init",
            "session_id": session_id,
            "nonce": "0x" + signed_nonce.hex(),
            "signature": "0x" + signature.hex(),
        }
    )
    error = await raw.next_error()
    await raw.ws.close()
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
    c.marketplace.complete_session(world.host, closed_id, 0, b"\0" * 32, "", b"")
    other_host = world.funded_sender("other-host", 100_000_000)
    c.token.approve(other_host, c.nodes.address, 10_000_000)
    c.nodes.register(other_host, "ws://elsewhere", {model_id: 2_000_000_000}, 10_000_000)
    c.token.approve(world.user, c.marketplace.address, 2_000_000)
    foreign_signer = Account.create()
    foreign_id = c.marketplace.create_session(
        world.user,
        host=other_host.address,
        model_id=model_id,
        deposit=2_000_000,
        price_per_mtok=2_000_000_000,
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
        assert stored is not None and stored.tokens == 10
        replay = {
            "type": "receipt",
            "tokens": 10,
            "proof_hash": "0x" + stored.proof_hash.hex(),
            "signature": "0x" + stored.signature.hex(),
        }
        await victim.send(replay)
        codes["replayed"] = str((await RawClient(victim.ws, {}).next_error())["code"])
        await victim.send({**replay, "tokens": 15})
        codes["wrong_count"] = str((await RawClient(victim.ws, {}).next_error())["code"])
        return codes

    async def run() -> tuple[int, dict[str, str]]:
        healthy_task = asyncio.create_task(healthy())
        codes = await bad_inputs()
        return await healthy_task, codes

    healthy_tokens, codes = asyncio.run(run())
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
    # 0.04 USDC at $0.002/token buys exactly 20 tokens.
    session_id, signer = open_session(world, model_id=model_id, deposit=40_000, proof_interval=10)
    node, server = start_node(scripted)

    async def run() -> tuple[str, str, str, int]:
        client = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world)
        )
        first = await client.chat(HELLO, max_tokens=5)
        second = await client.chat(HELLO)  # no max_tokens: what the budget allows
        with pytest.raises(SessionError) as refused:
            await client.chat(HELLO)
        ended = await client.end()
        return (
            first.finish_reason,
            second.finish_reason,
            refused.value.code,
            ended["tokens_receipted"],
        )

    first, second, refused, receipted = asyncio.run(run())
    assert (first, second, refused) == ("length", "budget", "BUDGET_EXHAUSTED")
    assert receipted == 20
    assert node.state.get_session(session_id).tokens_generated == 20


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
    assert node.state.get_session(session_id).tokens_receipted == 0


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

    model_id = serve_model(world, scripted, keccak(text="scripted"), price=3_000_000_000)
    session_id, signer = open_session(
        world, model_id=model_id, proof_interval=10, price=3_000_000_000
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
    assert model["price_per_mtok"] == 3_000_000_000
    session = httpx.get(server.url + f"/v1/sessions/{session_id}").json()
    assert session["tokens_receipted"] == 12
    assert [r["tokens"] for r in session["receipts"]] == [10, 12]
    assert httpx.get(server.url + "/v1/sessions/424242").status_code == 404
    metrics = httpx.get(server.url + "/metrics").text
    assert "inferledger_tokens_generated_total 12.0" in metrics
    assert "inferledger_receipt_round_trip_seconds_count 2.0" in metrics


def test_restarted_node_resumes_a_session_from_its_sqlite_state(
    world: DevWorld, scripted: Backend, start_node: NodeFactory, tmp_path
) -> None:
    model_id = serve_model(world, scripted, keccak(text="scripted"))
    session_id, signer = open_session(world, model_id=model_id, proof_interval=10)
    db = tmp_path / "shared.sqlite3"
    first_node, first = start_node(scripted, state_db=db)

    async def before_restart() -> SessionClient:
        client = await SessionClient.connect(
            first.ws_url, session_id, signer.key, expect=expect(world)
        )
        await client.chat(HELLO, max_tokens=15)
        await client.close()  # dropped without `end`
        return client

    dropped = asyncio.run(before_restart())
    first.stop()
    first_node.state.close()
    second_node, second = start_node(scripted, state_db=db)

    async def after_restart() -> tuple[int, int]:
        client = await SessionClient.connect(
            second.ws_url, session_id, signer.key, transcript=dropped.transcript
        )
        resumed_at = int(client.ready["tokens_receipted"])
        await client.chat(HELLO, max_tokens=10)
        ended = await client.end()
        return resumed_at, int(ended["tokens_receipted"])

    resumed_at, receipted = asyncio.run(after_restart())
    assert resumed_at == 15
    assert receipted == 25
    assert [r.tokens for r in second_node.state.receipts(session_id)] == [10, 15, 20, 25]
