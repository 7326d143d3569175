"""Closing a session: the node's settlement, and the chain fallbacks when it cannot settle."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from eth_account import Account
from node_support import wait_until
from test_faults import TcpProxy

from inferledger.chain.connect import connect
from inferledger.chain.contracts import Contracts
from inferledger.chain.devchain import INPUT_PRICE, PRICE, PROOF, dev_account, sign
from inferledger.chain.units import settlement_split, usdc
from inferledger.inference import Backend, load_backend
from inferledger.node import connection
from inferledger.node.node import Node
from inferledger.node.server import BackgroundServer
from inferledger.protocol.server import Settled, SettlementPending
from inferledger.sdk import Client, SdkError, SessionClosed, SessionRecord, lifecycle

if TYPE_CHECKING:
    from sdk_support import Market, NodeFactory

pytest_plugins = ["sdk_support"]
HELLO = [{"role": "user", "content": "hello"}]


@dataclass
class Rpc:
    """The chain's RPC behind a proxy that a test cuts and restores, and the deployment's
    contracts reached through it."""

    proxy: TcpProxy
    contracts: Contracts


@pytest.fixture
def rpc(market: Market) -> Iterator[Rpc]:
    if market.world.chain.is_embedded:
        pytest.skip("the embedded chain runs in-process: there is no RPC to lose")
    host, port = market.world.chain.url.removeprefix("http://").split(":")
    proxy = TcpProxy((host, int(port)))
    chain = connect(proxy.url, receipt_timeout=5)
    yield Rpc(proxy, Contracts.attach(chain, market.world.contracts.deployment))
    proxy.cut()


def held_up_node(
    start_node: NodeFactory, scripted: Backend, rpc: Rpc
) -> tuple[Node, BackgroundServer]:
    """A node whose chain is behind ``rpc``: it says settlement_pending at once and retries
    at least every half second."""
    return start_node(
        scripted, contracts=rpc.contracts, settlement_wait=0, settlement_retry_cap=0.5
    )


def test_close_returns_the_nodes_settlement_checked_against_the_chain(market: Market) -> None:
    c = market.world.contracts
    client = market.client()
    session = client.sessions.open(
        market.world.host.address, market.model_id, usdc("2"), proof_interval=10
    )
    session.chat_sync(HELLO, max_tokens=35)
    user_before = c.token.balance_of(client.address)
    earnings_before = c.earnings.balance_of(market.world.host.address, c.token.address)

    settlement = session.close()

    prices = (session.input_price_per_mtok, session.output_price_per_mtok)
    assert prices == (INPUT_PRICE, PRICE)
    split = settlement_split(usdc("2"), session.input_tokens, 35, *prices, c.marketplace.fee_bps())
    assert (settlement.status, settlement.reported_by) == ("settled", "node")
    # Both the prompt and the reply are paid, exactly what the session accepted.
    assert (settlement.input_tokens, settlement.output_tokens) == (session.input_tokens, 35)
    assert settlement.input_tokens > 0 and split.gross == session.cost
    assert (settlement.host_amount, settlement.fee, settlement.refund) == (
        split.host,
        split.fee,
        split.refund,
    )
    event = c.marketplace.settlement_event(session.id)
    assert event is not None and settlement.tx_hash == event.tx_hash
    assert c.token.balance_of(client.address) == user_before + split.refund
    assert (
        c.earnings.balance_of(market.world.host.address, c.token.address)
        == earnings_before + split.host
    )
    assert session not in lifecycle.open_sessions()
    saved = SessionRecord.model_validate_json(session.record_path.read_text())
    assert saved.settlement is not None and saved.settlement["tx_hash"] == event.tx_hash
    with pytest.raises(SessionClosed):
        session.chat_sync(HELLO)
    assert session.close() is settlement  # closing twice is harmless


def test_a_close_request_stops_the_reply_and_the_node_reports_the_settlement(
    market: Market, start_node: NodeFactory
) -> None:
    """SESSION_CLOSING as a user meets it: the depositor asks the chain to close (from
    another program, say); the node stops the reply in flight with finish_reason
    "closing", the session takes no more prompts, and close() hears the node out and
    returns its settlement of everything served."""
    _node, slow = start_node(
        load_backend("scripted", tokens_per_second=50), chain_poll_interval=0.05
    )
    client = market.client()
    session = client.sessions.open(
        market.world.host.address, market.model_id, usdc("2"), url=slow.ws_url
    )
    pieces = session.stream_sync(HELLO, max_tokens=500)
    next(pieces)
    market.world.contracts.marketplace.request_close(client.sender, session.id)
    for _ in pieces:  # the node stops the reply at its next token after it sees the request
        pass
    reply = session.last_reply
    assert reply is not None and reply.finish_reason == "closing"
    assert 1 <= len(reply.token_ids) < 500
    with pytest.raises(SessionClosed, match="settling"):
        session.chat_sync(HELLO)
    settlement = session.close()
    assert (settlement.status, settlement.reported_by) == ("settled", "node")
    assert settlement.output_tokens == session.tokens == len(reply.token_ids)
    assert settlement.input_tokens == session.input_tokens == reply.prompt_tokens > 0


def test_context_managers_close_the_session(market: Market) -> None:
    client = market.client()
    host, model = market.world.host.address, market.model_id
    with client.sessions.open(host, model, usdc("1")) as session:
        session.chat_sync(HELLO, max_tokens=3)
    assert session.settlement is not None and session.settlement.output_tokens == 3
    assert session.settlement.input_tokens == session.input_tokens > 0

    async def run() -> int:
        async with client.sessions.open(host, model, usdc("1")) as session:
            reply = await session.chat(HELLO, max_tokens=4)
        assert session.settlement is not None
        return reply.session_tokens

    assert asyncio.run(run()) == 4
    for session_id in client.contracts.marketplace.sessions_of_user(client.address)[:2]:
        assert client.sessions.status(session_id).state == "settled"


def test_without_a_node_close_requests_a_close_on_chain_then_finalize_settles(
    market: Market,
) -> None:
    c, chain = market.world.contracts, market.world.chain
    client = market.client()
    session = client.sessions.open(market.world.host.address, market.model_id, usdc("2"))
    session.chat_sync(HELLO, max_tokens=12)
    market.server.stop()  # the node is gone, its settlement worker with it

    started = time.monotonic()
    closing = session.close(timeout=5)
    assert time.monotonic() - started < 15
    info = c.marketplace.get_session(session.id)
    assert info.is_open and info.close_requested_at > 0
    assert (closing.status, closing.reported_by) == ("closing", "chain")
    assert closing.finalize_after == c.marketplace.session_deadline(session.id)
    assert "could not reach the node" in closing.message and "finalize()" in closing.message
    assert closing.tx_hash is not None and closing.refund == usdc("2")  # nothing checkpointed
    assert session not in lifecycle.open_sessions()
    with pytest.raises(SdkError, match="can be finalized after"):
        session.finalize()

    chain.time_travel(c.marketplace.close_window() + 2)
    refund_before = c.token.balance_of(client.address)
    settled = session.finalize()
    paid = (settled.input_tokens, settled.output_tokens)
    assert (settled.status, paid, settled.refund) == ("settled", (0, 0), usdc("2"))
    assert c.token.balance_of(client.address) == refund_before + usdc("2")
    assert client.sessions.status(session.id).settlement_tx == settled.tx_hash


def test_close_reads_a_settlement_the_host_made_directly(market: Market) -> None:
    """No node involved: the host completed the session with a receipt it holds."""
    c, world = market.world.contracts, market.world
    client = market.client()
    session = client.sessions.open(world.host.address, market.model_id, usdc("2"))
    signer = Account.from_key(session.record.signer_key.get_secret_value())
    signature = sign(world, signer, session.id, 0, 200, PROOF)
    direct = c.marketplace.complete_session(world.host, session.id, 0, 200, PROOF, "", signature)

    settlement = session.close()
    assert (settlement.status, settlement.reported_by) == ("settled", "chain")
    assert settlement.tx_hash == direct.tx_hash
    paid = (settlement.input_tokens, settlement.output_tokens)
    assert (paid, settlement.host_amount, settlement.fee, settlement.refund) == (
        (0, 200),
        360_000,
        40_000,
        1_600_000,
    )


def test_close_hears_settlement_pending_out_and_returns_the_nodes_settlement(
    market: Market, start_node: NodeFactory, scripted: Backend
) -> None:
    """settlement_pending is progress, not the answer: close() reads on to the node's
    ``settled`` frame and returns it, and the depositor never asks the chain to close."""
    _node, patient = start_node(scripted, settlement_wait=0)  # pending before every settled
    c = market.world.contracts
    client = market.client()
    session = client.sessions.open(
        market.world.host.address, market.model_id, usdc("2"), url=patient.ws_url
    )
    session.chat_sync(HELLO, max_tokens=20)
    seen: list[SettlementPending] = []

    settled = session.close(on_pending=seen.append)

    assert (settled.status, settled.reported_by) == ("settled", "node")
    assert (settled.input_tokens, settled.output_tokens) == (session.input_tokens, 20)
    assert seen and {frame.session_id for frame in seen} == {session.id}
    assert seen[0].reason in settled.message  # what the close waited for
    info = c.marketplace.get_session(session.id)
    assert info.is_settled and info.close_requested_at == 0
    event = c.marketplace.settlement_event(session.id)
    assert event is not None and settled.tx_hash == event.tx_hash


def test_an_rpc_outage_during_settlement_is_waited_out_without_a_close_request(
    market: Market, start_node: NodeFactory, scripted: Backend, rpc: Rpc
) -> None:
    """The operators' incident: the RPC is down for the node and the client when the
    session closes. close() asks the node without reading the chain, hears
    settlement_pending, keeps waiting while the node's attempts fail, and once the RPC is
    back returns the node's settlement, checked against the chain; no request_close."""
    node, server = held_up_node(start_node, scripted, rpc)
    client = Client(
        connect(rpc.proxy.url),  # the client's own connection through the same RPC
        key="0x" + dev_account("user").key.hex(),
        deployment=rpc.contracts.deployment,
        sessions_dir=market.sessions_dir,
    )
    session = client.sessions.open(
        market.world.host.address, market.model_id, usdc("2"), url=server.ws_url
    )
    session.chat_sync(HELLO, max_tokens=40)
    heard = threading.Event()
    seen: list[SettlementPending] = []

    def pending(frame: SettlementPending) -> None:
        seen.append(frame)
        heard.set()

    def failed_attempt() -> bool:
        settlement = node.outbox.settlement(session.id)
        return settlement is not None and settlement.attempts >= 1 and bool(settlement.last_error)

    rpc.proxy.cut()
    with ThreadPoolExecutor(1) as pool:
        closing = pool.submit(session.close, 90, on_pending=pending)
        assert heard.wait(60), "no settlement_pending from the node"
        wait_until(failed_attempt, "the node's settlement attempt to fail on the cut RPC", 60)
        assert not closing.done()  # still waiting for the node's word
        rpc.proxy.restore()
        settled = closing.result(timeout=120)

    assert (settled.status, settled.reported_by) == ("settled", "node")
    assert (settled.input_tokens, settled.output_tokens) == (session.input_tokens, 40)
    assert seen and seen[0].session_id == session.id
    info = market.world.contracts.marketplace.get_session(session.id)
    assert info.is_settled and info.close_requested_at == 0
    assert (info.input_tokens_paid, info.output_tokens_paid) == (session.input_tokens, 40)
    saved = SessionRecord.model_validate_json(session.record_path.read_text())
    assert saved.settlement is not None and saved.settlement["status"] == "settled"


def test_a_settlement_that_lands_after_close_stopped_waiting_is_learned_by_refresh(
    market: Market, start_node: NodeFactory, scripted: Backend, rpc: Rpc
) -> None:
    """The node's chain is down past close()'s timeout: the depositor's request_close is
    the fallback ("closing"). The node settles when its RPC is back, within the close
    window, and refresh (here by another client, as another process would) records it."""
    node, server = held_up_node(start_node, scripted, rpc)
    c = market.world.contracts
    client = market.client()
    session = client.sessions.open(
        market.world.host.address, market.model_id, usdc("2"), url=server.ws_url
    )
    session.chat_sync(HELLO, max_tokens=30)
    rpc.proxy.cut()

    closing = session.close(timeout=5)

    assert (closing.status, closing.reported_by) == ("closing", "chain")
    assert "still pending" in closing.message and "no word after 5s" in closing.message
    assert c.marketplace.get_session(session.id).close_requested_at > 0
    assert client.sessions.refresh(session.id).settlement == closing.as_dict()  # not yet
    rpc.proxy.restore()
    wait_until(lambda: c.marketplace.get_session(session.id).is_settled, "its settlement", 60)

    record = market.client().sessions.refresh(session.id)
    assert record.settlement is not None
    learned = record.settlement
    assert learned["status"] == "settled"
    assert (learned["input_tokens"], learned["output_tokens"]) == (session.input_tokens, 30)
    event = c.marketplace.settlement_event(session.id)
    assert event is not None and learned["tx_hash"] == event.tx_hash
    # The node's own transaction: it records it once its receipt is back, which may be just
    # after the chain shows it (polled, with a generous bound).
    wait_until(
        lambda: node.outbox.settlement(session.id).tx_hash == event.tx_hash,
        "the node to record its own settlement",
        60,
    )
    settled = session.close()  # the live session refreshes from the chain too
    assert (settled.status, settled.output_tokens) == ("settled", 30)
    assert settled.tx_hash == event.tx_hash


def test_a_node_that_gives_up_is_not_waited_for_and_refresh_learns_the_later_settlement(
    market: Market, start_node: NodeFactory, scripted: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node's second settlement_pending says it gave up: close() requests the close at
    once instead of waiting out its timeout. The host settles later with the receipt its
    node holds, and ``refresh_all`` records the node's counts."""
    node, server = start_node(scripted, settlement_wait=0)
    worker = node.settlement
    c, world = market.world.contracts, market.world
    client = market.client()
    session = client.sessions.open(
        world.host.address, market.model_id, usdc("2"), url=server.ws_url
    )
    session.chat_sync(HELLO, max_tokens=20)
    monkeypatch.setattr(worker, "settle", lambda job: worker._give_up(job, "no gas left"))
    seen: list[SettlementPending] = []

    started = time.monotonic()
    closing = session.close(timeout=120, on_pending=seen.append)

    assert time.monotonic() - started < 60
    assert (closing.status, closing.reported_by) == ("closing", "chain")
    assert "the node could not settle: no gas left" in closing.message
    assert seen[-1].reason == "the node could not settle: no gas left"
    assert c.marketplace.get_session(session.id).close_requested_at > 0
    receipt = node.state.latest_receipt(session.id)
    assert receipt is not None and receipt.tokens == 20
    c.marketplace.complete_session(
        world.host,
        session.id,
        receipt.input_tokens,
        receipt.tokens,
        receipt.proof_hash,
        "",
        receipt.signature,
    )

    (record,) = [r for r in market.client().sessions.refresh_all() if r.session_id == session.id]
    assert record.settlement is not None and record.settlement["status"] == "settled"
    paid = (record.settlement["input_tokens"], record.settlement["output_tokens"])
    assert paid == (session.input_tokens, 20)
    on_disk = SessionRecord.model_validate_json(session.record_path.read_text())
    assert on_disk.settlement == record.settlement


@pytest.mark.parametrize("lie", [{"output_tokens": 5}, {"host_amount": 1, "refund": -1}])
def test_a_settled_frame_the_chain_does_not_confirm_is_not_believed(
    market: Market,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    lie: dict[str, int],
) -> None:
    """A hostile node settles honestly but reports more: close() returns the chain's
    settlement, not the node's figures."""

    def inflated(**fields: Any) -> Settled:
        return Settled(**{**fields, **{name: fields[name] + more for name, more in lie.items()}})

    monkeypatch.setattr(connection, "Settled", inflated)
    c = market.world.contracts
    session = market.client().sessions.open(market.world.host.address, market.model_id, usdc("2"))
    session.chat_sync(HELLO, max_tokens=15)

    settlement = session.close()

    assert (settlement.status, settlement.reported_by) == ("settled", "chain")
    assert (settlement.input_tokens, settlement.output_tokens) == (session.input_tokens, 15)
    info = c.marketplace.get_session(session.id)
    split = info.paid_split()
    assert (settlement.host_amount, settlement.refund) == (split.host, split.refund)
    assert info.close_requested_at == 0
    assert "is not what the chain shows" in caplog.text


def test_without_a_record_the_depositor_requests_the_close_and_anyone_finalizes(
    market: Market, tmp_path: Path
) -> None:
    """Another machine's session: ``client.sessions`` closes it on chain by id alone."""
    c, chain = market.world.contracts, market.world.chain
    opened = market.client().sessions.open(market.world.host.address, market.model_id, usdc("1"))
    opened.detach()
    depositor = market.client(sessions_dir=tmp_path / "elsewhere")
    host = market.client("host", sessions_dir=tmp_path / "host")

    with pytest.raises(SdkError, match=f"only its depositor {depositor.address}"):
        host.sessions.request_close(opened.id)
    closing = depositor.sessions.request_close(opened.id)
    assert (closing.status, closing.refund, closing.tx_hash is not None) == (
        "closing",
        usdc("1"),
        True,
    )
    assert closing.finalize_after == c.marketplace.session_deadline(opened.id)
    assert "the node was not asked to settle" in closing.message
    again = host.sessions.request_close(opened.id)  # requested already: no transaction
    assert (again.status, again.tx_hash) == ("closing", None)
    with pytest.raises(SdkError, match="can be finalized after"):
        host.sessions.finalize(opened.id)

    chain.time_travel(c.marketplace.close_window() + 2)
    settled = host.sessions.finalize(opened.id)
    paid = (settled.input_tokens, settled.output_tokens)
    assert (settled.status, paid, settled.refund) == ("settled", (0, 0), usdc("1"))
    assert depositor.sessions.request_close(opened.id) == settled
    assert depositor.sessions.finalize(opened.id) == settled


def test_a_close_request_that_loses_the_race_to_the_nodes_settlement_reports_it(
    market: Market, monkeypatch: pytest.MonkeyPatch
) -> None:
    c, world = market.world.contracts, market.world
    client = market.client()
    session = client.sessions.open(world.host.address, market.model_id, usdc("2"))
    session.detach()
    signer = Account.from_key(session.record.signer_key.get_secret_value())
    signature = sign(world, signer, session.id, 7, 100, PROOF)
    request_close = client.contracts.marketplace.request_close

    def settled_first(*args: object) -> object:
        c.marketplace.complete_session(world.host, session.id, 7, 100, PROOF, "", signature)
        return request_close(*args)  # reverts: the session is settled

    monkeypatch.setattr(client.contracts.marketplace, "request_close", settled_first)
    settlement = client.sessions.request_close(session.id)
    paid = (settlement.input_tokens, settlement.output_tokens)
    assert (settlement.status, paid) == ("settled", (7, 100))
    assert settlement.tx_hash == c.marketplace.settlement_event(session.id).tx_hash


def test_a_session_resumed_without_auto_close_is_left_alone_at_exit(market: Market) -> None:
    client = market.client()
    session = client.sessions.open(market.world.host.address, market.model_id, usdc("1"))
    session.detach()
    assert client.sessions.resume(session.id, auto_close=False) not in lifecycle.open_sessions()
    assert client.sessions.resume(session.id) in lifecycle.open_sessions()
