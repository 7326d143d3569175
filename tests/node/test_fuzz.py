"""Every input bounded: hostile frames and paths get BAD_FRAME or a 400, never INTERNAL or
a 500, and a healthy session streaming on the same node is billed exactly.

Embedded chain only: every hostile input is refused by the frame parser, the path check or
one read of a session that does not exist, none of which depends on the chain's transport;
anvil would double the run time and reach no other code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from node_support import (
    NodeFactory,
    SyncSealed,
    expect,
    serve_model,
    session_init_frame,
    signed_receipt,
)
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from inferledger.chain.devchain import DevWorld
from inferledger.chain.receipts import (
    Receipt,
    ReceiptDomain,
    check_receipt_signature,
)
from inferledger.chain.units import settlement_split, usdc
from inferledger.inference import Backend, load_backend
from inferledger.node.metering import Counts
from inferledger.node.node import Node
from inferledger.protocol.client import INT64_MAX, End, Prompt, parse_client_frame
from inferledger.protocol.codes import ProtocolError
from inferledger.protocol.server import (
    NodeFrameError,
    Settled,
    SettlementPending,
    parse_node_frame,
)
from inferledger.sdk.wire import Reply, SessionClient
from support import open_session

embedded_only = pytest.mark.parametrize("chain", ["embedded"], indirect=True)

HELLO = [{"role": "user", "content": "hello"}]
MAX_FRAME_BYTES = 4096
NATURAL_REPLY = 8  # the fuzz node's backend stops here, whatever max_tokens a prompt asks
HEALTHY_REPLY = 6  # tokens per healthy reply: ends by `length`, never by the backend's stop
NONCE = "<the connection's nonce>"  # replaced at send time, so a login reaches the chain
SIGNATURE = "0x" + "11" * 65


# Bounds, and the two known bugs ---------------------------------------------------------


@pytest.mark.parametrize("session_id", [2**63, 2**256])
@embedded_only
def test_a_session_id_beyond_int64_is_a_bad_frame(
    scripted: Backend, start_node: NodeFactory, session_id: int
) -> None:
    """Once an INTERNAL with a traceback (issue 11); the node's SQLite holds int64 ids."""
    _node, server = start_node(scripted)
    with connect(server.ws_url) as ws:
        nonce = json.loads(ws.recv())["nonce"]
        init = {"session_id": session_id, "nonce": nonce, "signature": SIGNATURE, "salt": NONCE}
        ws.send(json.dumps({"type": "session_init", **init}))
        assert json.loads(ws.recv(10))["code"] == "BAD_FRAME"
        ws.send(json.dumps({"type": "ping"}))
        assert json.loads(ws.recv(10))["type"] == "pong", "BAD_FRAME keeps the connection"


@pytest.mark.parametrize("segment", [str(2**63), str(2**256), "0", "-1", "abc", "9" * 5000])
@embedded_only
def test_a_session_path_id_out_of_bounds_is_a_400(
    scripted: Backend, start_node: NodeFactory, segment: str
) -> None:
    """2**63 was a 500 (SQLite overflow) and ``abc`` a 404 that read like "no such session"."""
    _node, server = start_node(scripted)
    answer = httpx.get(f"{server.url}/v1/sessions/{segment}")
    assert answer.status_code == 400
    assert answer.json() == {
        "error": "BAD_REQUEST",
        "message": f"session_id must be an integer from 1 to {INT64_MAX}",
    }


@pytest.mark.parametrize(
    ("frame", "field", "bound"),
    [
        ({"type": "token", "request_id": "r", "index": 1, "text": ""}, "token_id", INT64_MAX),
        ({"type": "receipt_ack", "input_tokens": 0}, "output_tokens", INT64_MAX),
        (
            {"type": "settled", "session_id": 1, "input_tokens": 0, "output_tokens": 0}
            | {"fee": 0, "refund": 0, "refund_credited": None, "tx_hash": None},
            "host_amount",
            2**256 - 1,
        ),
    ],
)
def test_a_node_frame_integer_beyond_its_bound_is_refused_by_the_client(
    frame: dict[str, Any], field: str, bound: int
) -> None:
    """A hostile node's huge token id would otherwise overflow the SDK's transcript hash."""
    assert parse_node_frame(json.dumps(frame | {field: bound})).type == frame["type"]
    with pytest.raises(NodeFrameError, match=field):
        parse_node_frame(json.dumps(frame | {field: bound + 1}))


# Hostile values ------------------------------------------------------------------------

BOUNDARY_INTS = [0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 2**256 - 1, 2**256]
NUMBER_STRINGS = ["NaN", "inf", "-Infinity", "1e400", "0x10", "1_000", "", "null", "true"]
hostile = st.one_of(
    st.sampled_from([*BOUNDARY_INTS, -(2**256), 10**400]),
    st.integers(),
    st.floats(),  # NaN and infinities too: json.dumps writes them as NaN, Infinity
    st.sampled_from(NUMBER_STRINGS),
    st.booleans(),
    st.none(),
    st.text(max_size=80),
    st.sampled_from(["x" * 3000, "é" * 1500]),
    st.lists(st.integers(), max_size=4),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=3),
)

TEMPLATES: dict[str, dict[str, Any]] = {
    "session_init": {
        "type": "session_init",
        "session_id": 1,
        "nonce": NONCE,
        "signature": SIGNATURE,
        "salt": NONCE,
    },
    "prompt": {
        "type": "prompt",
        "request_id": "fuzz",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["."],
    },
    "receipt": {
        "type": "receipt",
        "input_tokens": 0,
        "output_tokens": 0,
        "proof_hash": "0x" + "00" * 32,
        "signature": SIGNATURE,
    },
    "end": {"type": "end"},
    "ping": {"type": "ping"},
}


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every field of a frame, nested ones included (``("messages", 0, "role")``)."""
    if isinstance(value, dict):
        items: Iterable[tuple[Any, Any]] = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return
    for key, child in items:
        yield (*prefix, key)
        yield from _paths(child, (*prefix, key))


@st.composite
def mutated_frame(draw: st.DrawFn) -> dict[str, Any]:
    """A valid frame with one field replaced by a hostile value, dropped, or one field added."""
    frame = json.loads(json.dumps(TEMPLATES[draw(st.sampled_from(sorted(TEMPLATES)))]))
    *parents, last = draw(st.sampled_from(list(_paths(frame))))
    holder = frame
    for key in parents:
        holder = holder[key]
    action = draw(st.sampled_from(["replace", "drop", "add"]))
    if action == "replace":
        holder[last] = draw(hostile)
    elif action == "drop":
        del holder[last]
    else:
        frame[draw(st.text(min_size=1, max_size=8))] = draw(hostile)
    return frame


def _hex(size: int) -> st.SearchStrategy[str]:
    return st.binary(min_size=size, max_size=size).map(lambda b: "0x" + b.hex())


# Valid frames at their bounds: they reach the meter, the backend and the chain.
int64 = st.one_of(st.sampled_from([0, 1, INT64_MAX - 1, INT64_MAX]), st.integers(0, INT64_MAX))
positive = int64.filter(bool)
chat = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=100)}
    ),
    min_size=1,
    max_size=4,
)
prompt_options = {
    "max_tokens": st.none() | positive,
    "temperature": st.floats(0, 5),
    "top_p": st.floats(0, 1, exclude_min=True),
    "seed": st.none() | int64,
    "stop": st.lists(st.text(min_size=1, max_size=64), max_size=8),
}
bounded_frame = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("session_init"), "session_id": positive | st.integers(1, 20)}
        | {"nonce": st.just(NONCE), "signature": _hex(65), "salt": _hex(32)}
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("prompt"),
            "request_id": st.text(min_size=1, max_size=64),
            "messages": chat,
        },
        optional=prompt_options,
    ),
    st.fixed_dictionaries(
        {"type": st.just("receipt"), "input_tokens": int64, "output_tokens": int64}
        | {"proof_hash": _hex(32), "signature": _hex(65)}
    ),
    st.sampled_from([{"type": "end"}, {"type": "ping"}]),
)

junk = st.one_of(
    st.text(max_size=20).map(lambda kind: json.dumps({"type": kind})),
    st.text(max_size=200),
    st.binary(max_size=200),
    hostile.map(json.dumps),  # JSON, but not an object
    st.sampled_from(
        [
            "[" * 4000,  # deeper than the JSON parser's stack
            '{"type": "ping", "x": ' + "[" * 900 + "]" * 900 + "}",
            "1" * 4090,  # more digits than Python converts
            '{"type": "ping"}' + " " * MAX_FRAME_BYTES,  # FRAME_TOO_LARGE
            '{"type": "ping", "type": "prompt"}',
        ]
    ),
)
frames = st.tuples(
    st.one_of(mutated_frame().map(json.dumps), bounded_frame.map(json.dumps), junk),
    st.booleans(),  # send a JSON text as a binary frame
    st.booleans(),  # on the logged-in connection (else before login)
)

ROUTES = ["/v1/sessions/{}", "/v1/proofs/{}", "/health?{}", "/metrics?{}", "/v1/models?{}"]
segments = st.one_of(
    st.sampled_from([*BOUNDARY_INTS, -(2**256)]).map(str),
    st.integers().map(str),
    st.sampled_from(
        [*NUMBER_STRINGS, "00", "\u0661", "9" * 5000, "0x" + "ab" * 32, "0X" + "AB" * 32]
    ),
    st.text(max_size=80),
)
requests = st.tuples(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"]),
    st.sampled_from(ROUTES),
    segments.map(lambda s: quote(s, safe="")),
)


# Clients -------------------------------------------------------------------------------


class Healthy(threading.Thread):
    """An honest client chatting until told to stop, then ending its session and waiting
    for the settlement, in a thread of its own while the fuzzer runs."""

    def __init__(self, url: str, session_id: int, signer: LocalAccount, world: DevWorld) -> None:
        super().__init__(name="healthy-session", daemon=True)
        self.url, self.session_id, self.signer, self.world = url, session_id, signer, world
        self.streaming = threading.Event()
        self.stop = threading.Event()
        self.replies: list[Reply] = []
        self.client: SessionClient | None = None
        self.settlement: Settled | SettlementPending | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._chat())
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc
            self.streaming.set()

    async def _chat(self) -> None:
        client = await SessionClient.connect(
            self.url, self.session_id, self.signer.key, expect=expect(self.world)
        )
        self.client = client
        while not self.stop.is_set():
            self.replies.append(await client.chat(HELLO, max_tokens=HEALTHY_REPLY))
            self.streaming.set()
        await client.end()
        self.settlement = await client.wait_settlement(60)
        await client.close()


class Prober:
    """Sends hostile frames on a connection before login and on one logged in to a session
    of its own, answering the node as an honest client would in between; reconnects after a
    fatal error. ``answers`` holds every frame the node answered with."""

    def __init__(
        self, url: str, session_id: int, signer: LocalAccount, domain: ReceiptDomain
    ) -> None:
        self.url, self.session_id, self.signer, self.domain = url, session_id, signer, domain
        self.open: dict[bool, tuple[ClientConnection | SyncSealed, str]] = {}
        self.answers: list[dict[str, Any]] = []
        self.sockets = contextlib.ExitStack()

    def _connection(self, logged_in: bool) -> tuple[ClientConnection | SyncSealed, str]:
        """Before login a stranger's plaintext socket; after it, one sealed channel (every
        hostile frame then reaches the node's parser sealed, as a real client's would)."""
        if logged_in not in self.open:
            raw = self.sockets.enter_context(connect(self.url, max_size=2**24))
            if logged_in:
                sealed = SyncSealed(raw)
                self.open[logged_in] = sealed, sealed.challenge["nonce"]
                self._login(sealed, sealed.challenge)
            else:
                self.open[logged_in] = raw, json.loads(raw.recv(10))["nonce"]
        return self.open[logged_in]

    def _login(self, ws: SyncSealed, challenge: dict[str, Any]) -> None:
        ws.send(json.dumps(session_init_frame(challenge, self.session_id, self.signer.key)))
        ready = ws.recv(10)
        assert ready["type"] == "session_ready", ready
        self._answer_until(ws, "pong", ping=True)

    def probe(self, frame: str | bytes, *, binary: bool, logged_in: bool) -> None:
        """Send ``frame`` (a text as a binary frame if ``binary``), then read until the node
        has answered it: a prompt's reply ends with ``done``; anything else is followed by
        a ping and answered by its pong."""
        ws, nonce = self._connection(logged_in)
        if isinstance(frame, str):
            frame = frame.replace(NONCE, nonce)
            frame = frame.encode() if binary else frame
        prompt = logged_in and isinstance(_parsed(frame), Prompt)
        try:
            ws.send(frame)
            self._answer_until(ws, "done" if prompt else "pong", ping=not prompt)
        except ConnectionClosed:
            del self.open[logged_in]

    def _answer_until(self, ws: ClientConnection | SyncSealed, last: str, ping: bool) -> None:
        if ping:
            ws.send(json.dumps({"type": "ping"}))
        while True:
            answer = ws.recv(20)
            answer = answer if isinstance(answer, dict) else json.loads(answer)
            self.answers.append(answer)
            if answer["type"] == "receipt_request":
                ws.send(
                    json.dumps(
                        signed_receipt(answer, self.session_id, self.signer.key, self.domain)
                    )
                )
            if answer["type"] == last or (last == "done" and answer["type"] == "error"):
                return

    def close(self) -> None:
        self.sockets.close()


def _parsed(frame: str | bytes) -> object:
    """What the node's own parser makes of ``frame`` (None if it refuses it)."""
    try:
        return parse_client_frame(frame, MAX_FRAME_BYTES)
    except ProtocolError:
        return None


# The fuzz test -------------------------------------------------------------------------


@embedded_only
def test_hostile_frames_and_requests_never_fail_the_node_or_a_healthy_session(
    world: DevWorld, start_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Each example sends one hostile frame (before login or on a logged-in session of its
    own) and one hostile HTTP request; per example no INTERNAL and no 5xx, and at the end
    no error in the node's log and the healthy session billed to the token."""
    backend = load_backend("scripted", tokens_per_second=300, output_tokens=NATURAL_REPLY)
    model_id = serve_model(world, backend, keccak(text="scripted"))
    healthy_id, healthy_signer = open_session(
        world, model_id=model_id, deposit=usdc("20"), proof_interval=10
    )
    fuzz_id, fuzz_signer = open_session(
        world, model_id=model_id, deposit=usdc("50"), proof_interval=10
    )
    node, server = start_node(backend, max_frame_bytes=MAX_FRAME_BYTES, disconnect_grace=3600)
    caplog.set_level(logging.ERROR)
    logging.getLogger("uvicorn").addHandler(caplog.handler)  # it does not propagate to root
    healthy = Healthy(server.ws_url, healthy_id, healthy_signer, world)
    healthy.start()
    assert healthy.streaming.wait(30) and healthy.error is None, healthy.error
    prober = Prober(server.ws_url, fuzz_id, fuzz_signer, node.domain)
    statuses: set[int] = set()

    @settings(
        max_examples=150,
        deadline=timedelta(seconds=10),
        derandomize=True,
        database=None,
    )
    @given(frame=frames, request=requests)
    def fuzz(frame: tuple[str | bytes, bool, bool], request: tuple[str, str, str]) -> None:
        text, binary, logged_in = frame
        assume(not (logged_in and isinstance(_parsed(text), End)))  # would settle the prober
        seen = len(prober.answers)
        prober.probe(text, binary=binary, logged_in=logged_in)
        assert [a for a in prober.answers[seen:] if a.get("code") == "INTERNAL"] == []
        method, route, segment = request
        status = httpx.request(method, server.url + route.format(segment), timeout=10).status_code
        statuses.add(status)
        assert status < 500

    try:
        fuzz()
    finally:
        prober.close()
        logging.getLogger("uvicorn").removeHandler(caplog.handler)
        healthy.stop.set()
        healthy.join(90)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []
    codes = {a["code"] for a in prober.answers if a["type"] == "error"}
    assert codes >= {"BAD_FRAME", "UNKNOWN_TYPE", "FRAME_TOO_LARGE", "NOT_AUTHENTICATED"}, codes
    assert statuses >= {200, 400, 404}, statuses
    _assert_billed_exactly(world, node, healthy)


def _assert_billed_exactly(world: DevWorld, node: Node, healthy: Healthy) -> None:
    """Every healthy reply whole, every token receipted once, and the chain paid just that."""
    assert healthy.error is None, healthy.error
    assert healthy.client is not None and healthy.client.ended is not None
    replies = healthy.replies
    assert len(replies) >= 2, "the healthy session streamed while the fuzzer ran"
    assert {(len(r.token_ids), r.finish_reason) for r in replies} == {(HEALTHY_REPLY, "length")}
    total = Counts(sum(r.prompt_tokens for r in replies), HEALTHY_REPLY * len(replies))
    ended = healthy.client.ended
    assert Counts(ended.served_input_tokens, ended.served_output_tokens) == total
    assert Counts(ended.receipted_input_tokens, ended.receipted_output_tokens) == total
    receipts = node.state.receipts(healthy.session_id)
    counts = [r.counts for r in receipts]
    assert counts == sorted(set(counts)) and counts[-1] == total  # each one new, the last all
    for r in receipts:
        receipt = Receipt(healthy.session_id, r.input_tokens, r.tokens, r.proof_hash)
        check_receipt_signature(node.domain, receipt, r.signature, healthy.signer.address)
    settled = healthy.settlement
    assert isinstance(settled, Settled), settled
    info = world.contracts.marketplace.get_session(healthy.session_id)
    assert Counts(info.input_tokens_paid, info.output_tokens_paid) == total
    assert Counts(settled.input_tokens, settled.output_tokens) == total
    prices = info.input_price_per_mtok, info.output_price_per_mtok
    split = settlement_split(info.deposit, total.input, total.output, *prices, info.fee_bps)
    assert (settled.host_amount, settled.fee, settled.refund) == (
        split.host,
        split.fee,
        split.refund,
    )
