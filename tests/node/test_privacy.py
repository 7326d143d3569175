"""Nothing secret or private leaves the node (issue 11, part 2; docs/architecture.md, threat
model: a stranger).

- An RPC URL carrying an API key (userinfo, path and query) appears in no ``/health`` body,
  frame, ``settlement_pending`` reason, ``/v1/sessions`` body or log line, while the chain
  is up, down and back.
- ``/v1/sessions/{id}`` answers only a request signed by the session signer.
- A stranger holding the public bundles and a list of candidate prompts (the true one among
  them) cannot tell which was asked; the user, or a verifier the user gives the salt, can.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from eth_account import Account
from eth_utils import keccak
from node_support import (
    NodeFactory,
    expect,
    open_sealed,
    read_session,
    serve_model,
    user_salt,
    wait_until,
)
from test_node_settlement import DEPOSIT, HELLO, INPUT_PRICE, PRICE, wait_settled

from inferledger.chain.anvil import free_port
from inferledger.chain.connect import connect
from inferledger.chain.contracts import Contracts
from inferledger.chain.devchain import DevWorld
from inferledger.chain.receipts import READ_TIMESTAMP_HEADER, SessionAuth, sign_session_auth
from inferledger.inference import Backend
from inferledger.proofs.activation import build_chunk_proofs, segment_chunks
from inferledger.proofs.bundle import ProofBundle, mask_proof
from inferledger.proofs.transcript import TranscriptHash
from inferledger.proofs.verify import BundleVerdict, ReplyTranscript, verify_bundle
from inferledger.protocol.server import SettlementPending
from inferledger.sdk.wire import Expectation, SessionClient, session_read_headers
from support import open_session

SECRET = "SECRETKEY"
KEYED_PATH = f"/v1/{SECRET}?apikey={SECRET}"


class KeyedRpc:
    """A hosted RPC endpoint in miniature: answers JSON-RPC only at its keyed URL (basic auth
    and a key in the path and the query, as providers do) by forwarding to ``target``;
    ``cut()`` stops it answering until ``restore()``."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.port = free_port()
        self.seen: list[tuple[str, str]] = []  # (path, Authorization) of every request
        self._server: ThreadingHTTPServer | None = None
        self.restore()

    @property
    def url(self) -> str:
        return f"http://user:{SECRET}@127.0.0.1:{self.port}{KEYED_PATH}"

    def restore(self) -> None:
        rpc = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                rpc.seen.append((self.path, self.headers.get("Authorization", "")))
                if self.path != KEYED_PATH:
                    self.send_error(404)
                    return
                answer = httpx.post(
                    rpc.target, content=body, headers={"Content-Type": "application/json"}
                ).content
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: object) -> None:
                pass  # the test reads the node's log, not ours

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def cut(self) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()


async def login_frames(world: DevWorld, ws_url: str, session_id: int, key: bytes) -> list[str]:
    """The raw frames a correctly signed login gets: the challenge and the node's answer."""
    ws, frame = await open_sealed(ws_url)
    async with ws.ws:
        challenge = json.dumps(frame)
        nonce = frame["nonce"]
        auth = SessionAuth(session_id, bytes.fromhex(nonce[2:]), world.host.address)
        signature = sign_session_auth(key, world.contracts.marketplace.domain(), auth)
        init = {
            "type": "session_init",
            "session_id": session_id,
            "nonce": nonce,
            "signature": "0x" + signature.hex(),
            "salt": "0x" + user_salt(world, session_id, key).hex(),
        }
        await ws.send(json.dumps(init))
        answer = await asyncio.wait_for(ws.recv(), 60)
        return [challenge, answer.decode() if isinstance(answer, bytes) else answer]


def test_no_url_or_key_leaves_the_node_when_the_rpc_url_carries_one(
    world: DevWorld, scripted: Backend, start_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    if world.chain.is_embedded:
        pytest.skip("the embedded chain has no URL")
    caplog.set_level(logging.INFO)  # what `inferledger node run` logs
    rpc = KeyedRpc(world.chain.url)
    contracts = Contracts.attach(connect(rpc.url, receipt_timeout=5), world.contracts.deployment)
    model_id = serve_model(world, scripted, keccak(text=scripted.name), PRICE, INPUT_PRICE)
    session_id, signer = open_session(
        world, model_id=model_id, deposit=DEPOSIT, input_price=INPUT_PRICE, output_price=PRICE
    )
    node, server = start_node(
        scripted, contracts=contracts, settlement_wait=1.0, settlement_retry_cap=1.0
    )
    shown = [httpx.get(server.url + "/health").text]

    async def chat_then_lose_the_chain() -> SettlementPending:
        client = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world)
        )
        await client.chat(HELLO, max_tokens=40)
        rpc.cut()
        await client.end()
        pending = await client.wait_settlement(30)
        await client.close()
        assert isinstance(pending, SettlementPending), pending
        return pending

    shown.append(asyncio.run(chat_then_lose_the_chain()).reason)
    wait_until(lambda: node.health.unreachable, "the node to see the outage")
    health = httpx.get(server.url + "/health")
    assert health.status_code == 503 and health.json()["problems"]
    frames = asyncio.run(login_frames(world, server.ws_url, session_id, signer.key))
    error = json.loads(frames[-1])
    assert (error["code"], error["message"]) == ("CHAIN_UNAVAILABLE", "chain unavailable; retry")
    while_down = read_session(server.url, world, session_id, signer.key)
    assert while_down.json()["settlement"]["last_error"]  # the signer sees what failed...
    shown += [health.text, *frames, while_down.text]

    rpc.restore()
    wait_settled(node, session_id)
    shown += [read_session(server.url, world, session_id, signer.key).text, caplog.text]
    assert "cannot reach the chain at http://127.0.0.1:" in caplog.text  # ...and the log
    for text in shown:
        assert SECRET not in text and "user:" not in text, text
    # The node did talk through the keyed URL: the key was there to leak.
    credentials = base64.b64encode(f"user:{SECRET}".encode()).decode()
    assert rpc.seen and set(rpc.seen) == {(KEYED_PATH, f"Basic {credentials}")}


def test_the_sessions_route_answers_only_the_session_signer(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    model_id = serve_model(world, scripted, keccak(text=scripted.name), PRICE, INPUT_PRICE)
    session_id, signer = open_session(world, model_id=model_id)
    _, server = start_node(scripted)

    async def chat() -> None:
        client = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world)
        )
        await client.chat(HELLO, max_tokens=10)
        await client.close()

    asyncio.run(chat())
    mine = read_session(server.url, world, session_id, signer.key)
    assert mine.status_code == 200 and mine.json()["receipts"]
    depositor = mine.json()["depositor"]
    assert depositor.lower() == world.user.address.lower()

    def get(session_id: int, headers: dict[str, str] | None = None) -> httpx.Response:
        return httpx.get(f"{server.url}/v1/sessions/{session_id}", headers=headers)

    fresh = headers_for(world, signer.key, session_id, time.time())
    stranger = Account.create()
    elsewhere = Expectation(expect(world).domain, Account.create().address)  # another host
    now = time.time()
    refused = {
        "unsigned": (get(session_id), 401),
        "stale": (get(session_id, headers_for(world, signer.key, session_id, now - 120)), 401),
        "malformed": (get(session_id, {**fresh, READ_TIMESTAMP_HEADER: "1" * 5000}), 401),
        "a stranger": (get(session_id, headers_for(world, stranger.key, session_id, now)), 404),
        "another session's signature": (
            get(session_id, headers_for(world, signer.key, session_id + 1, now)),
            404,
        ),
        "another host's signature": (
            get(session_id, session_read_headers(signer.key, elsewhere, session_id)),
            404,
        ),
    }
    for what, (response, status) in refused.items():
        assert response.status_code == status, what
        assert depositor.lower() not in response.text.lower(), what
        assert set(response.json()) == {"error", "message"}, what
    # A stranger's 404 for a real session is the 404 for a session that does not exist.
    unknown = get(424242, headers_for(world, stranger.key, 424242, now))
    assert unknown.json()["error"] == refused["a stranger"][0].json()["error"]
    assert unknown.json()["message"] == refused["a stranger"][0].json()["message"].replace(
        str(session_id), "424242"
    )


def headers_for(world: DevWorld, key: bytes, session_id: int, now: float) -> dict[str, str]:
    return session_read_headers(key, expect(world), session_id, now)


CANDIDATES = [
    [{"role": "user", "content": text}]
    for text in ("hello", "what does a positive test for this mean?", "draft my resignation")
]
ASKED = CANDIDATES[1]


def stranger_guesses(
    backend: Backend, prompt: Sequence[int], reply: Sequence[int], session_id: int
) -> list[bytes]:
    """What a stranger with the model computes from a guessed prompt (and even the exact
    reply) to find in a public bundle: the unsalted prompt hash and transcript hash chain,
    and the activation proofs of a prefill over prompt + reply."""
    unsalted_prompt = keccak(b"".join(t.to_bytes(8, "big", signed=True) for t in prompt))
    chain = TranscriptHash(session_id)
    for token in reply:
        chain.update(token)
    rows = backend.prefill_hidden_states([*prompt, *reply])
    proofs = build_chunk_proofs(rows, 0, segment_chunks(len(prompt), 0, len(reply)))
    return [unsalted_prompt, chain.value, *proofs]


def test_a_stranger_cannot_confirm_a_guessed_prompt_but_the_users_verifier_can(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    model_id = serve_model(world, scripted, keccak(text=scripted.name), PRICE, INPUT_PRICE)
    session_id, signer = open_session(world, model_id=model_id, proof_interval=100)
    node, server = start_node(scripted)

    async def ask() -> list[int]:
        client = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world)
        )
        reply = await client.chat(ASKED, max_tokens=40, temperature=0)
        await client.end()
        await client.wait_settlement(30)
        await client.close()
        return reply.token_ids

    reply = asyncio.run(ask())
    (checkpoint,) = node.outbox.checkpoints(session_id)
    public = httpx.get(f"{server.url}/v1/proofs/0x{checkpoint.proof_hash.hex()}").content
    bundle = ProofBundle.decode(public)

    for messages in CANDIDATES:
        guesses = stranger_guesses(scripted, scripted.tokenize_chat(messages), reply, session_id)
        assert not [g for g in guesses if g.hex() in public.decode()], messages

    # Without the salt the guess would have matched: the true prompt's proofs are the
    # bundle's, unmasked.
    salt = user_salt(world, session_id, signer.key)
    prompt = tuple(scripted.tokenize_chat(ASKED))
    (segment,) = bundle.segments
    unmasked = [
        mask_proof(p, salt, bundle.checkpoint_index, 0, i)
        for i, p in enumerate(segment.activation_proofs)
    ]
    assert unmasked == stranger_guesses(scripted, prompt, reply, session_id)[2:]

    def verdict(prompt_ids: Sequence[int], salt: bytes) -> BundleVerdict:
        kept = [ReplyTranscript(tuple(prompt_ids), tuple(reply), 0)]
        options = {"host": world.host.address, "model_id": model_id}
        return verify_bundle(bundle, kept, scripted.prefill_hidden_states, salt=salt, **options)

    assert verdict(prompt, salt).status == "pass"  # the user, or a verifier given the salt
    for messages in CANDIDATES:
        guessed = scripted.tokenize_chat(messages)
        for key in (bytes(32), keccak(b"a guess")):  # a stranger has only guesses of the salt
            assert verdict(guessed, key).status == "fail", messages
        if messages is not ASKED:
            wrong = verdict(guessed, salt)
            assert wrong.reason == "segment 0: prompt_hash differs from the kept prompt"
