"""The node believes the chain, not its memory: events by block range, confirmations,
reconciliation, close requests it never saw, and what ``/health`` says about the chain.

These run in process on both chains; the faults that need a separate node process and a
JSON-RPC chain (reorganisations, a stopped chain, a node down) are in test_chain_faults.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from eth_utils import keccak
from node_support import NodeFactory, expect, serve_model, wait_until
from test_node_settlement import DEPOSIT, HELLO, INPUT_PRICE, PRICE, hello_tokens, open_served
from web3.middleware import Web3Middleware

from inferledger.chain.contracts import SessionInfo
from inferledger.chain.devchain import DevWorld
from inferledger.chain.errors import ChainUnreachable
from inferledger.inference import Backend
from inferledger.node.node import Node
from inferledger.node.outbox import SettlementRecord
from inferledger.node.reconciler import compare
from inferledger.node.state import HostedSession, session_record
from inferledger.sdk.wire import SessionClient


@contextmanager
def counted_rpc(world: DevWorld) -> Iterator[Counter[str]]:
    """Count the JSON-RPC methods this thread asks the chain connection for, by name (the
    node's own threads share the connection)."""
    calls: Counter[str] = Counter()
    mine = threading.get_ident()

    class Count(Web3Middleware):
        def wrap_make_request(self, make_request: Any) -> Any:
            def counting(method: Any, params: Any) -> Any:
                if threading.get_ident() == mine:
                    calls[str(method)] += 1
                return make_request(method, params)

            return counting

    onion = world.chain.w3.middleware_onion
    onion.add(Count, name="count-rpc")
    try:
        yield calls
    finally:
        onion.remove("count-rpc")


def _still_node(start_node: NodeFactory, backend: Backend, **settings: object) -> Node:
    """A node whose worker polls and reconciles only when the test calls it: its thread is
    stopped (after its first pass), so nothing else reads the chain or moves the cursor."""
    node, _server = start_node(
        backend, chain_poll_interval=3600, reconcile_interval=3600, **settings
    )
    node.settlement.stop()
    return node


def test_the_watcher_asks_the_chain_the_same_per_poll_for_1_or_1000_open_sessions(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    session_id, _signer = open_served(world, scripted)
    node = _still_node(start_node, scripted)
    worker = node.settlement
    info = world.contracts.marketplace.get_session(session_id)
    node.state.upsert_session(session_record(info))

    def one_poll() -> Counter[str]:
        world.chain.mine()  # a new block, so the poll has a range to read
        with counted_rpc(world) as calls:
            worker._poll_chain()
        return calls

    one_poll()  # the first poll reads from the deployment block
    with_one = one_poll()
    # 999 more sessions held open (terms copied; the watcher reads none of them from chain).
    far = world.chain.now() + 86_400
    for n in range(1, 1000):
        node.state.upsert_session(
            dataclasses.replace(session_record(info), session_id=10_000 + n, expires_at=far)
        )
    assert len(node.state.held_sessions()) == 1000
    with_thousand = one_poll()
    assert with_thousand == with_one, (with_one, with_thousand)
    assert sum(with_one.values()) <= 4 and with_one["eth_getLogs"] == 1

    # ... and it still hears a close request among them.
    world.contracts.marketplace.request_close(world.user, session_id)
    with counted_rpc(world) as calls:
        worker._poll_chain()
    settlement = node.outbox.settlement(session_id)
    assert settlement is not None and settlement.reason == "close_requested"
    assert calls["eth_call"] <= 2  # no read per held session


def test_a_close_request_for_a_session_the_node_never_served_is_settled_after_adopt_after(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    session_id, _signer = open_served(world, scripted)
    node, _server = start_node(scripted, chain_poll_interval=0.2, adopt_after=0)
    market = world.contracts.marketplace
    before = world.contracts.token.balance_of(world.user.address)
    market.request_close(world.user, session_id)
    wait_until(lambda: market.get_session(session_id).is_settled, "the node to settle it")
    info = market.get_session(session_id)
    assert (info.input_tokens_paid, info.output_tokens_paid) == (0, 0)
    # Settled by the host long before the close window would let anyone finalize.
    assert world.chain.now() < market.session_deadline(session_id)
    assert world.contracts.token.balance_of(world.user.address) == before + DEPOSIT
    assert node.outbox.settlement(session_id).reason == "close_requested"
    # The node now keeps books for the session it adopted.
    assert node.state.get_session(session_id) is not None


def test_an_adopted_session_waits_so_a_node_that_served_it_is_paid_its_receipts(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    """Two nodes of one host: the one that never served the session must not settle it at
    the on-chain checkpoint (0 tokens) before the one holding the receipts can."""
    session_id, _signer = open_served(world, scripted)
    node = _still_node(start_node, scripted)
    assert node.settings.adopt_after == 300
    world.contracts.marketplace.request_close(world.user, session_id)
    before = time.time()
    node.settlement._poll_chain()
    node.settlement.run_once()
    job = node.outbox.settlement(session_id)
    assert job is not None and job.status == "pending" and job.reason == "close_requested"
    assert job.due_at >= before + 300
    assert world.contracts.marketplace.get_session(session_id).is_open
    # Heard again (a rescan after a reorganisation): the delay stands.
    node.settlement._close_requested(session_id)
    assert node.outbox.settlement(session_id).due_at == job.due_at


def test_a_stranger_cannot_make_the_node_adopt_another_hosts_session(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    session_id, _signer = open_served(world, scripted)
    node = _still_node(start_node, scripted)
    worker = node.settlement
    info = world.contracts.marketplace.get_session(session_id)
    # The watcher sees a close request for a session whose host is someone else.
    other = dataclasses.replace(info, host=world.user.address)
    worker.market = _Reads(worker.market, other)  # type: ignore[assignment]
    worker._adopt(session_id)
    assert node.state.get_session(session_id) is None
    assert node.outbox.settlement(session_id) is None


class _Reads:
    """A marketplace whose get_session answers ``info`` (everything else passes through)."""

    def __init__(self, market: Any, info: SessionInfo) -> None:
        self._market, self._info = market, info

    def get_session(self, session_id: int) -> SessionInfo:
        return self._info

    def __getattr__(self, name: str) -> Any:
        return getattr(self._market, name)


def test_health_says_degraded_with_the_reason_while_the_chain_does_not_answer(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    serve_model(world, scripted, keccak(text=scripted.name), PRICE, INPUT_PRICE)
    node, server = start_node(scripted)
    assert node.health is not None
    healthy = httpx.get(server.url + "/health")
    assert healthy.status_code == 200 and healthy.json()["problems"] == []
    node.health.failed(ChainUnreachable("cannot reach the chain"), "the settlement of session 7")
    down = httpx.get(server.url + "/health")
    assert down.status_code == 503
    body = down.json()
    assert body["status"] == "degraded" and body["accepting_sessions"] is False
    (problem,) = body["problems"]
    assert "the chain RPC does not answer" in problem and "session 7" in problem
    assert "inferledger_chain_up 0.0" in httpx.get(server.url + "/metrics").text
    node.health.reachable()
    assert httpx.get(server.url + "/health").status_code == 200
    node.health.gas_balance(5, 10)
    low = httpx.get(server.url + "/health").json()
    assert low["status"] == "degraded" and "min_gas_balance_wei" in low["problems"][0]


def test_a_settlement_the_chain_lost_is_settled_again_and_confirmed_only_when_deep(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    """In process: the node's own chain connection is the test's, so the 'loss' is a
    snapshot revert; the multi-process version is in test_chain_faults.py."""
    session_id, signer = open_served(world, scripted)
    node, server = start_node(
        scripted, chain_poll_interval=3600, reconcile_interval=3600, confirmations=3
    )
    worker = node.settlement
    snapshot = world.chain.snapshot()

    async def chat_and_end() -> None:
        client = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world)
        )
        await client.chat(HELLO, max_tokens=40)
        await client.end()
        assert (await client.wait_settlement(30)).type == "settled"
        await client.close()

    asyncio.run(chat_and_end())
    market = world.contracts.marketplace
    first = node.outbox.settlement(session_id)
    assert first.status == "settled" and not first.confirmed and first.block_number
    world.chain.revert(snapshot)  # the settlement's block is gone
    assert market.get_session(session_id).is_open
    worker._poll_chain()  # notices: open on chain, settled in the books
    assert node.outbox.settlement(session_id).status == "pending"
    assert [d.kind for d in node.state.open_discrepancies()] == ["settlement_lost"]
    # The books, not only the chain: the worker records the new transaction once its
    # receipt is back, which can be after the chain already shows the session settled.
    wait_until(
        lambda: node.outbox.settlement(session_id).status == "settled",
        "the second settlement in the books",
    )
    info = market.get_session(session_id)
    assert info.is_settled
    assert (info.input_tokens_paid, info.output_tokens_paid) == (hello_tokens(scripted), 40)
    worker._poll_chain()
    assert not node.outbox.settlement(session_id).confirmed  # one block deep of three
    world.chain.mine()
    world.chain.mine()
    worker._poll_chain()
    again = node.outbox.settlement(session_id)
    assert again.status == "settled" and again.confirmed
    assert node.state.open_discrepancies() == []


RECORD = HostedSession(1, "0xd", "0xs", b"m" * 32, 10**6, 1, 2, 100, 10**9)


def _info(**fields: Any) -> SessionInfo:
    base = {f.name: 0 for f in dataclasses.fields(SessionInfo)}
    base.update(session_id=1, depositor="0xd", host="0xh", deposit=10**6, expires_at=10**9)
    base.update(model_id=b"m" * 32, proof_hash=bytes(32), signer="0xs", status=1)
    base.update(fields)
    return SessionInfo(**base)


def _settlement(status: str = "settled", reason: str = "end", **fields: Any) -> SettlementRecord:
    base = dict(
        session_id=1, reason=reason, status=status, due_at=0.0, attempts=0, last_error=None,
        tx_hash="0xt", input_tokens=5, tokens=40, host_amount=0, fee=0, refund=0,
        refund_credited=False, created_at=0.0,
    )  # fmt: skip
    base.update(fields)
    return SettlementRecord(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("settlement", "chain", "kind", "repair"),
    [
        (_settlement(), {"status": 1}, "settlement_lost", "settle_again"),
        (None, {"status": 2, "input_tokens_paid": 5, "output_tokens_paid": 40},
         "settled_on_chain", "record_chain"),
        (_settlement("pending"), {"status": 2}, "settled_on_chain", "record_chain"),
        (_settlement(), {"status": 2, "input_tokens_paid": 5, "output_tokens_paid": 32},
         "paid_differs", "record_chain"),
        (None, {"status": 1, "close_requested_at": 7}, "close_missed", "stop_and_settle"),
        (_settlement("pending", "disconnect"), {"status": 1, "close_requested_at": 7},
         "close_missed", "stop_and_settle"),
        (None, {"status": 0}, "unknown_on_chain", None),
    ],
)  # fmt: skip
def test_reconciliation_names_each_difference_and_its_repair(
    settlement: SettlementRecord | None, chain: dict[str, Any], kind: str, repair: str | None
) -> None:
    (finding,) = compare(RECORD, settlement, _info(**chain))
    assert (finding.kind, finding.repair) == (kind, repair)


@pytest.mark.parametrize(
    ("settlement", "chain"),
    [
        (_settlement(), {"status": 2, "input_tokens_paid": 5, "output_tokens_paid": 40}),
        (None, {"status": 1}),
        (_settlement("pending", "end"), {"status": 1, "close_requested_at": 7}),
    ],
)
def test_books_that_agree_with_the_chain_raise_nothing(
    settlement: SettlementRecord | None, chain: dict[str, Any]
) -> None:
    assert compare(RECORD, settlement, _info(**chain)) == []
