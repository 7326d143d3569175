"""Closing a session: the node's settlement, and the chain fallbacks when it cannot settle."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from eth_account import Account

from inferledger.chain.devchain import INPUT_PRICE, PRICE, PROOF, sign
from inferledger.chain.units import settlement_split, usdc
from inferledger.inference import load_backend
from inferledger.sdk import SdkError, SessionClosed, SessionRecord, lifecycle

if TYPE_CHECKING:
    from sdk_support import Market, NodeFactory

pytest_plugins = ["sdk_support"]
HELLO = [{"role": "user", "content": "hello"}]


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


def test_a_node_that_cannot_settle_at_once_is_backed_by_the_chain(
    market: Market, start_node: NodeFactory, scripted: object
) -> None:
    """settlement_pending: the SDK falls back to the chain; the node still settles in the
    close window, and a second close() reports it."""
    _node, patient = start_node(scripted, settlement_wait=0)
    client = market.client()
    session = client.sessions.open(
        market.world.host.address, market.model_id, usdc("2"), url=patient.ws_url
    )
    session.chat_sync(HELLO, max_tokens=20)
    first = session.close()
    assert first.reported_by == "chain"
    assert first.status in ("settled", "closing")
    deadline = time.monotonic() + 20
    while not (settled := session.close()).settled:
        assert time.monotonic() < deadline, "the node never settled"
        time.sleep(0.2)
    assert settled.output_tokens == 20 and settled.tx_hash is not None
    assert settled.input_tokens == session.input_tokens > 0


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
