"""Opening sessions, chatting through a real node, resuming after a dropped connection."""

from __future__ import annotations

import asyncio
import json
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from inferledger.chain.receipts import Receipt, check_receipt_signature
from inferledger.chain.units import cost, usdc
from inferledger.inference import load_backend
from inferledger.proofs.transcript import TranscriptHash
from inferledger.sdk import SdkError, SessionRecord

if TYPE_CHECKING:
    from sdk_support import Market, NodeFactory

pytest_plugins = ["sdk_support"]
HELLO = [{"role": "user", "content": "hello"}]


def test_open_pulls_the_deposit_with_a_fresh_signer_and_persists_the_record(
    market: Market,
) -> None:
    c = market.world.contracts
    client = market.client()
    user = client.address
    assert user is not None
    before = c.token.balance_of(user)
    escrow_before = c.token.balance_of(c.marketplace.address)

    (offer,) = client.hosts.list(model=market.model_id)
    first = client.sessions.open(offer, None, usdc("2"), proof_interval=10)
    second = client.sessions.open(market.world.host.address, market.model_id, usdc("1"))

    assert c.token.balance_of(user) == before - usdc("3")
    assert c.token.balance_of(c.marketplace.address) == escrow_before + usdc("3")
    info = c.marketplace.get_session(first.id)
    assert info.is_open and info.depositor == user and info.deposit == usdc("2")
    assert info.signer == first.signer
    assert first.signer not in (user, second.signer)  # a fresh key per session
    assert info.price_per_mtok == offer.price_per_mtok  # the host's price by default
    assert (info.proof_interval, second.record.proof_interval) == (10, 100)
    assert info.expires_at - info.created_at == 86400
    assert first.url == market.server.ws_url  # the registered URL, as a WebSocket

    path = first.record_path
    assert path.parent == market.sessions_dir
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds the signer key
    saved = SessionRecord.model_validate(json.loads(path.read_text()))
    assert saved.signer_key == first.record.signer_key
    assert (saved.session_id, saved.chain_id, saved.marketplace) == (
        first.id,
        market.world.chain.chain_id,
        c.marketplace.address,
    )
    other_process = market.client().sessions.resume(first.id)
    assert other_process.signer == first.signer and other_process.url == first.url
    assert [r.session_id for r in client.sessions.records()] == [second.id, first.id]
    for session in (first, second, other_process):
        session.detach()


def test_open_refuses_what_the_contract_would_reject(market: Market) -> None:
    client = market.client()
    host = market.world.host.address
    with pytest.raises(SdkError, match="does not serve model"):
        client.sessions.open(host, "some/other-model.gguf", usdc("2"))
    with pytest.raises(SdkError, match="exceeds the balance"):
        client.sessions.open(host, market.model_id, usdc("1000"))
    with pytest.raises(SdkError, match="above your"):
        client.sessions.open(host, market.model_id, usdc("2"), price_per_mtok=1)
    with pytest.raises(SdkError, match="fewer than one proof interval"):
        client.sessions.open(host, market.model_id, usdc("0.1"), proof_interval=100_000)


def test_chat_through_a_node_signs_checked_receipts_and_records_the_transcript(
    market: Market,
) -> None:
    client = market.client()
    session = client.sessions.open(
        market.world.host.address, market.model_id, usdc("2"), proof_interval=10
    )
    first = session.chat_sync(HELLO, max_tokens=25)

    async def streamed() -> tuple[list[str], object]:
        pieces = [piece async for piece in session.stream(HELLO, max_tokens=12)]
        return pieces, session.last_reply

    pieces, second = asyncio.run(streamed())
    third = asyncio.run(session.chat(HELLO, max_tokens=3))

    assert len(first.token_ids) == 25 and first.finish_reason == "length" and first.text
    assert "".join(pieces) == second.text and len(second.token_ids) == 12
    assert third.session_tokens == session.tokens == 40
    assert third.cost == session.cost == cost(40, session.price_per_mtok)

    # The node holds a receipt for every interval and every reply's tail, signed by the
    # session signer over exactly what we received.
    wait_until(lambda: market.node.state.latest_receipt(session.id).tokens == 40)
    stored = market.node.state.receipts(session.id)
    assert [r.tokens for r in stored] == [10, 20, 25, 30, 37, 40]
    for r in stored:
        check_receipt_signature(
            c_domain(market),
            Receipt(session.id, r.tokens, r.proof_hash),
            r.signature,
            session.signer,
        )
    # Our record has the same receipts, each with the transcript hash we checked.
    record = SessionRecord.model_validate_json(session.record_path.read_text())
    assert [r.tokens for r in record.receipts] == [10, 20, 25, 30, 37, 40]
    assert [r.proof_hash for r in record.receipts] == ["0x" + r.proof_hash.hex() for r in stored]
    ids = first.token_ids + second.token_ids + third.token_ids
    assert record.token_ids() == ids
    assert [(r.first_token, len(r.token_ids)) for r in record.replies] == [
        (0, 25),
        (25, 12),
        (37, 3),
    ]
    for receipt in record.receipts:
        transcript = TranscriptHash(session.id)
        for token_id in ids[: receipt.tokens]:
            transcript.update(token_id)
        assert receipt.transcript_hash == "0x" + transcript.value.hex()
    assert record.replies[1].messages == HELLO and record.replies[1].params == {"max_tokens": 12}
    session.detach()


def c_domain(market: Market):
    return market.world.contracts.marketplace.domain()


def test_a_dropped_connection_resumes_from_the_nodes_last_receipt(
    market: Market, start_node: NodeFactory
) -> None:
    # A slow node, and an interval longer than the reply: the drop lands mid-stream while
    # the node holds no receipt for the tokens streamed so far.
    _node, slow = start_node(load_backend("scripted", tokens_per_second=100))
    client = market.client()
    session = client.sessions.open(
        market.world.host.address, market.model_id, usdc("2"), url=slow.ws_url
    )
    session.chat_sync(HELLO, max_tokens=5)  # receipted at 5 by the reply's tail receipt
    pieces = session.stream_sync(HELLO, max_tokens=60)
    seen = [next(pieces) for _ in range(8)]
    pieces.close()  # stop reading: the connection is dropped mid-reply
    cut = session.record.replies[-1]
    assert session.connections == 1 and seen and 8 <= len(cut.token_ids) < 60
    assert cut.finish_reason is None

    reply = session.chat_sync(HELLO, max_tokens=7)  # reconnects, resumes at 5
    assert session.connections == 2
    assert reply.session_tokens == session.tokens == 12
    record = session.record
    # The cut reply's tokens were never receipted: not billed, not in the transcript.
    assert [(r.first_token, len(r.token_ids)) for r in record.replies] == [(0, 5), (5, 7)]
    assert [r.tokens for r in record.receipts] == [5, 12]
    assert record.receipts[-1].transcript_hash == "0x" + record.transcript_hash().hex()

    # Another process picks it up from the record and carries on.
    session.detach()
    resumed = market.client().sessions.resume(session.id)
    more = resumed.chat_sync(HELLO, max_tokens=4)
    assert more.session_tokens == 16
    wait_until(lambda: _node.state.latest_receipt(session.id).tokens == 16)
    assert resumed.record.token_ids() == record.token_ids() + more.token_ids
    resumed.detach()


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
