"""Opening sessions, chatting through a real node, resuming after a dropped connection."""

from __future__ import annotations

import asyncio
import json
import stat
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from eth_account import Account

from inferledger.chain.devchain import INPUT_PRICE, PRICE
from inferledger.chain.receipts import Receipt, check_receipt_signature
from inferledger.chain.units import cost, usdc
from inferledger.inference import load_backend
from inferledger.proofs.transcript import TranscriptHash
from inferledger.protocol.client import prompt_token_bound
from inferledger.sdk import SdkError, SessionRecord
from inferledger.sdk.sessions import ShortSessionWarning
from inferledger.sdk.wire import Expectation, History, SessionClient, SessionError

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
    # The host's two prices by default, snapshotted by the session and kept in the record.
    prices = (info.input_price_per_mtok, info.output_price_per_mtok)
    assert prices == (offer.input_price_per_mtok, offer.output_price_per_mtok)
    assert prices == (INPUT_PRICE, PRICE)
    assert (first.input_price_per_mtok, first.output_price_per_mtok) == prices
    assert (info.proof_interval, second.record.proof_interval) == (10, 100)
    assert info.expires_at - info.created_at == 86400
    assert first.url == market.server.ws_url  # the registered URL, as a WebSocket

    path = first.record_path
    assert path.parent == market.sessions_dir
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds the signer key
    saved = SessionRecord.model_validate(json.loads(path.read_text()))
    assert saved.signer_key == first.record.signer_key
    key = first.record.signer_key.get_secret_value()
    assert Account.from_key(key).address == first.signer
    assert key not in repr(first.record) and key not in repr(first)  # shown nowhere else
    assert (saved.input_price_per_mtok, saved.output_price_per_mtok) == prices
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
        client.sessions.open(host, market.model_id, usdc("2"), max_output_price_per_mtok=1)
    with pytest.raises(SdkError, match="above your"):
        client.sessions.open(host, market.model_id, usdc("2"), max_input_price_per_mtok=1)
    with pytest.raises(SdkError, match="fewer than one proof interval"):
        client.sessions.open(host, market.model_id, usdc("0.1"), proof_interval=100_000)
    with pytest.raises(SdkError, match="below the marketplace's minimum of 60s"):
        client.sessions.open(host, market.model_id, usdc("2"), max_duration=59)
    with pytest.raises(SdkError, match="above the marketplace's maximum"):
        client.sessions.open(host, market.model_id, usdc("2"), max_duration=30 * 86400 + 1)
    assert market.world.contracts.marketplace.sessions_of_user(client.address) == []


def test_a_short_session_warns_that_a_tenth_of_it_goes_to_settling(market: Market) -> None:
    client = market.client()
    host = market.world.host.address
    with pytest.warns(ShortSessionWarning, match="usable for 108s") as caught:
        short = client.sessions.open(host, market.model_id, usdc("1"), max_duration=120)
    assert caught[0].filename == __file__  # the warning points at the caller's line
    info = market.world.contracts.marketplace.get_session(short.id)
    assert info.expires_at - info.created_at == 120  # opened all the same
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 300 s and more: no warning
        usable = client.sessions.open(host, market.model_id, usdc("1"), max_duration=300)
    for session in (short, usable):
        session.detach()


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
    # Each prompt is billed its tokens (no more than it could hold), both prices apply.
    prompts = [first.prompt_tokens, second.prompt_tokens, third.prompt_tokens]
    assert all(0 < p <= prompt_token_bound(HELLO) for p in prompts)
    billed = [prompts[0], prompts[0] + prompts[1], sum(prompts)]
    assert [first.input_tokens, second.input_tokens, third.input_tokens] == billed
    assert session.input_tokens == sum(prompts)
    assert third.cost == session.cost == cost(sum(prompts), 40, INPUT_PRICE, PRICE)
    assert session.cost > cost(0, 40, INPUT_PRICE, PRICE)

    # The node holds a receipt for every interval and every reply's tail, signed by the
    # session signer over exactly what we received and the prompts we sent.
    wait_until(lambda: market.node.state.latest_receipt(session.id).tokens == 40)
    stored = market.node.state.receipts(session.id)
    counts = [(r.input_tokens, r.tokens) for r in stored]
    p1, p2, _ = billed
    assert counts == [(p1, 10), (p1, 20), (p1, 25), (p2, 30), (p2, 37), (sum(prompts), 40)]
    for r in stored:
        check_receipt_signature(
            c_domain(market),
            Receipt(session.id, r.input_tokens, r.tokens, r.proof_hash),
            r.signature,
            session.signer,
        )
    # Our record has the same receipts, each with the transcript hash we checked.
    record = SessionRecord.model_validate_json(session.record_path.read_text())
    assert [(r.input_tokens, r.tokens) for r in record.receipts] == counts
    assert [r.proof_hash for r in record.receipts] == ["0x" + r.proof_hash.hex() for r in stored]
    assert [r.prompt_tokens for r in record.replies] == prompts
    assert record.input_tokens == sum(prompts)
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
    assert record.replies[1].messages == HELLO
    # The SDK drew the sampler's seed and kept it: the reply is checkable against it.
    params = dict(record.replies[1].params)
    assert isinstance(params.pop("seed"), int) and params == {"max_tokens": 12}
    session.detach()


def c_domain(market: Market):
    return market.world.contracts.marketplace.domain()


def test_a_dropped_connection_resumes_and_pays_for_what_the_node_streamed(
    market: Market, start_node: NodeFactory
) -> None:
    # A slow node: the drop lands mid-stream, with tokens streamed that no receipt covers.
    # Nothing resets on reconnect: the node replays them, the SDK checks the ones it saw,
    # learns the ones it missed, and signs for all of them before the next prompt.
    node, slow = start_node(load_backend("scripted", tokens_per_second=100))
    client = market.client()
    session = client.sessions.open(
        market.world.host.address, market.model_id, usdc("2"), url=slow.ws_url
    )
    session.chat_sync(HELLO, max_tokens=5)  # receipted at 5 by the reply's tail receipt
    pieces = session.stream_sync(HELLO, max_tokens=60)
    seen = [next(pieces) for _ in range(8)]
    pieces.close()  # stop reading: the connection is dropped mid-reply
    cut = session.record.replies[-1]
    seen_ids = list(cut.token_ids)
    assert session.connections == 1 and seen and 8 <= len(seen_ids) < 60
    assert cut.finish_reason is None
    assert session.record.signed_counts()[1] == 5  # nothing of the cut reply is signed yet

    reply = session.chat_sync(HELLO, max_tokens=7)  # reconnects, settles up, then prompts
    assert session.connections == 2
    record = session.record
    streamed = record.receipts[1].tokens - 5  # what the node sent of the cut reply
    assert len(seen_ids) <= streamed < 60
    assert cut.token_ids[: len(seen_ids)] == seen_ids  # what we saw, then what we missed
    assert reply.session_tokens == session.tokens == 5 + streamed + 7
    assert [(r.first_token, len(r.token_ids)) for r in record.replies] == [
        (0, 5),
        (5, streamed),
        (5 + streamed, 7),
    ]
    # The cut reply's prompt and tokens were paid on resume, before the next prompt.
    prompts = [r.prompt_tokens for r in record.replies]
    assert all(p is not None and p > 0 for p in prompts)
    p1, p2, p3 = (p or 0 for p in prompts)
    assert [(r.input_tokens, r.tokens) for r in record.receipts] == [
        (p1, 5),
        (p1 + p2, 5 + streamed),
        (p1 + p2 + p3, 12 + streamed),
    ]
    # The node stores a reply's last receipt just after its done frame: wait for it.
    wait_until(lambda: node.state.latest_receipt(session.id).tokens == 12 + streamed)
    assert [(r.input_tokens, r.tokens) for r in node.state.receipts(session.id)] == [
        (r.input_tokens, r.tokens) for r in record.receipts
    ]
    assert record.receipts[-1].transcript_hash == "0x" + record.transcript_hash().hex()
    assert session.cost == cost(p1 + p2 + p3, 12 + streamed, INPUT_PRICE, PRICE)

    # Another process picks it up from the record and carries on.
    session.detach()
    resumed = market.client().sessions.resume(session.id)
    more = resumed.chat_sync(HELLO, max_tokens=4)
    assert more.session_tokens == 16 + streamed
    wait_until(lambda: node.state.latest_receipt(session.id).tokens == 16 + streamed)
    assert resumed.record.token_ids() == record.token_ids() + more.token_ids
    resumed.detach()


def test_a_prompt_while_a_receipt_is_owed_is_refused_by_the_node(
    market: Market, start_node: NodeFactory
) -> None:
    """What RECEIPT_OWED means: the SDK settles up on resume, so a user never sees it
    unless a client skips that; a raw wire client that does gets the error."""
    node, slow = start_node(load_backend("scripted", tokens_per_second=100))
    client = market.client()
    session = client.sessions.open(
        market.world.host.address, market.model_id, usdc("2"), url=slow.ws_url
    )
    pieces = session.stream_sync(HELLO, max_tokens=60)
    next(pieces)
    pieces.close()  # dropped owing a receipt
    session.detach()
    record = session.record
    last = record.replies[-1]

    async def prompt_without_settling_up() -> tuple[str, list[str]]:
        history = History(
            token_ids=tuple(record.token_ids()),
            input_tokens=record.input_tokens,
            signed=record.signed_counts(),
            reply_open=True,
            unconfirmed_prompt_bound=0 if last.prompt_tokens else prompt_token_bound(HELLO),
        )
        expect = Expectation(c_domain(market), record.host)
        for _ in range(100):  # the dropped connection may look live to the node briefly
            try:
                wire = await SessionClient.connect(
                    slow.ws_url,
                    session.id,
                    record.signer_key.get_secret_value(),
                    expect=expect,
                    history=history,
                )
                break
            except SessionError as exc:
                assert exc.code == "SESSION_BUSY"
                await asyncio.sleep(0.05)
        # A prompt at once, without reading (so without signing) the node's request.
        await wire.send({"type": "prompt", "request_id": "x", "messages": HELLO, "max_tokens": 3})
        seen = []
        try:
            while True:
                frame = await asyncio.wait_for(wire.frames.next(), 10)
                seen.append(frame.type)
                if frame.type == "error":
                    return frame.code, seen
        finally:
            await wire.close()

    code, seen = asyncio.run(prompt_without_settling_up())
    assert (code, seen) == ("RECEIPT_OWED", ["receipt_request", "error"])
    # The Session itself settles up first, so it carries on.
    resumed = client.sessions.resume(session.id)
    reply = resumed.chat_sync(HELLO, max_tokens=3)
    assert len(reply.token_ids) == 3
    wait_until(lambda: node.state.latest_receipt(session.id).tokens == reply.session_tokens)
    resumed.detach()


def test_a_refused_receipt_request_signs_nothing_and_drops_the_connection(
    market: Market, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the SDK refuses what a node says (here, as if its receipt request lied), it
    signs nothing and drops the connection; the next call starts afresh, and an honest
    node's request for the same tokens is checked and signed before the next prompt."""
    client = market.client()
    session = client.sessions.open(market.world.host.address, market.model_id, usdc("2"))
    answer = SessionClient._answer

    async def refuse_once(wire: SessionClient, request: object) -> None:
        monkeypatch.setattr(SessionClient, "_answer", answer)
        raise SessionError("RECEIPT_REFUSED", "the node asks a receipt for tokens we never got")

    monkeypatch.setattr(SessionClient, "_answer", refuse_once)
    with pytest.raises(SessionError, match="RECEIPT_REFUSED"):
        session.chat_sync(HELLO, max_tokens=5)
    assert session.record.receipts == [] and session.connections == 1
    assert market.node.state.latest_receipt(session.id) is None
    assert len(session.record.replies[0].token_ids) == 5  # received, kept, not yet signed

    reply = session.chat_sync(HELLO, max_tokens=3)  # reconnects, signs the 5, then prompts
    assert session.connections == 2
    assert [r.tokens for r in session.record.receipts] == [5, 8]
    assert reply.session_tokens == 8
    session.detach()


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
