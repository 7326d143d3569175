"""Checkpoints and settlement end to end, with the scripted backend on both chains.

Every test ends by checking the money: the deposit is split exactly into host, treasury and
refund by the tokens the user signed for, and the session is no longer open.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_utils import keccak
from node_support import NodeFactory, expect, read_session, serve_model, user_salt

from inferledger.chain.devchain import DevWorld
from inferledger.chain.units import cost, settlement_split, usdc
from inferledger.inference import Backend
from inferledger.node.node import Node
from inferledger.node.outbox import CheckpointRecord
from inferledger.proofs.bundle import ProofBundle
from inferledger.proofs.verify import ReplyTranscript, verify_bundle
from inferledger.protocol.server import Settled, SettlementPending
from inferledger.sdk.wire import History, SessionClient
from support import open_dispute, open_session

HELLO = [{"role": "user", "content": "hello"}]
DEPOSIT = usdc("2")
PRICE = 2_000_000_000  # output: $0.002 per token
INPUT_PRICE = 500_000_000  # input: $0.0005 per token
EXAMPLE_PROVER = Path(__file__).resolve().parents[2] / "examples" / "provers" / "hash_prover.py"


def open_priced(
    world: DevWorld, model_id: bytes, interval: int = 100, **options: Any
) -> tuple[int, Any]:
    """A session of DEPOSIT at this module's prices, for a model the host serves."""
    return open_session(
        world,
        model_id=model_id,
        deposit=DEPOSIT,
        input_price=INPUT_PRICE,
        output_price=PRICE,
        proof_interval=interval,
        **options,
    )


def open_served(world: DevWorld, backend: Backend, interval: int = 100) -> tuple[int, Any]:
    model_id = serve_model(world, backend, keccak(text=backend.name), PRICE, INPUT_PRICE)
    return open_priced(world, model_id, interval)


def hello_tokens(backend: Backend) -> int:
    """The input tokens one HELLO prompt is billed."""
    return len(backend.tokenize_chat(HELLO))


def assert_paid_exactly(
    world: DevWorld, session_id: int, input_tokens: int, output_tokens: int
) -> None:
    """The session is settled at exactly these counts, both priced, and every base unit of
    the deposit is accounted for."""
    info = world.contracts.marketplace.get_session(session_id)
    assert info.is_settled, f"session {session_id} still open"
    assert (info.input_tokens_paid, info.output_tokens_paid) == (input_tokens, output_tokens)
    assert (info.input_price_per_mtok, info.output_price_per_mtok) == (INPUT_PRICE, PRICE)
    split = settlement_split(DEPOSIT, input_tokens, output_tokens, INPUT_PRICE, PRICE, info.fee_bps)
    assert split.gross == cost(input_tokens, output_tokens, INPUT_PRICE, PRICE)
    assert split.host + split.fee + split.refund == DEPOSIT
    assert split.fee == split.gross // 10 and split.host == split.gross - split.fee


def newest_bundle(checkpoints: list[CheckpointRecord], tokens: int) -> bytes:
    """The proof hash a receipt for ``tokens`` output tokens names: the newest bundle
    built by then (zero before the first)."""
    built = [cp.proof_hash for cp in checkpoints if cp.token_end <= tokens]
    return built[-1] if built else bytes(32)


def wait_until(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def wait_settled(node: Node, session_id: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        settlement = node.outbox.settlement(session_id)
        if settlement is not None and settlement.status == "settled":
            return
        time.sleep(0.05)
    raise AssertionError(f"session {session_id} not settled in {timeout}s: {settlement}")


async def _chat_and_end(
    world: DevWorld, url: str, session_id: int, key: bytes, max_tokens: int
) -> tuple[list[int], Settled | SettlementPending | None, list[tuple[int, bytes]]]:
    """One reply, then `end`: its token ids, the node's settlement frame, and the
    (output tokens, proof hash) of every receipt signed."""
    client = await SessionClient.connect(url, session_id, key, expect=expect(world))
    reply = await client.chat(HELLO, max_tokens=max_tokens)
    await client.end()
    settled = await client.wait_settlement(30)
    await client.close()
    return reply.token_ids, settled, [(r.tokens, r.proof_hash) for r in client.receipts]


def test_end_settles_exactly_and_the_stored_proofs_verify(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    host_before = world.contracts.earnings.balance_of(
        world.host.address, world.contracts.token.address
    )
    session_id, signer = open_served(world, scripted)
    node, server = start_node(scripted)
    ids, settled, signed = asyncio.run(
        _chat_and_end(world, server.ws_url, session_id, signer.key, 250)
    )

    billed = hello_tokens(scripted)
    assert len(ids) == 250
    assert isinstance(settled, Settled), settled
    split = settlement_split(DEPOSIT, billed, 250, INPUT_PRICE, PRICE, 1000)
    assert split.gross == billed * 500 + 250 * 2000  # the prompt is paid for too
    assert (settled.input_tokens, settled.output_tokens) == (billed, 250)
    assert (settled.host_amount, settled.fee, settled.refund) == (
        split.host,
        split.fee,
        split.refund,
    )
    assert_paid_exactly(world, session_id, billed, 250)
    c = world.contracts
    assert c.earnings.balance_of(world.host.address, c.token.address) - host_before == split.host

    checkpoints = node.outbox.checkpoints(session_id)
    assert [(cp.token_start, cp.token_end) for cp in checkpoints] == [
        (0, 100),
        (100, 200),
        (200, 250),
    ]
    assert {cp.status for cp in checkpoints} == {"settled"}
    # Receipts at least every window (32 tokens), at every bundle and at the end; each names
    # the newest bundle when it was asked for, and every bundle was signed for when built.
    counts = [tokens for tokens, _ in signed]
    assert counts == sorted(set(counts)) and {100, 200, 250} <= set(counts)
    assert all(b - a <= 32 for a, b in zip([0, *counts], counts, strict=False))
    assert [h for _, h in signed] == [newest_bundle(checkpoints, n) for n in counts]
    assert {cp.prover for cp in checkpoints} == {"activation"}

    prompt = tuple(scripted.tokenize_chat(HELLO))
    replies = [ReplyTranscript(prompt, tuple(ids), 0)]
    for checkpoint in checkpoints:
        served = httpx.get(f"{server.url}/v1/proofs/0x{checkpoint.proof_hash.hex()}")
        assert served.status_code == 200
        assert keccak(served.content) == checkpoint.proof_hash
        bundle = ProofBundle.decode(served.content)
        verdict = verify_bundle(
            bundle,
            replies,
            scripted.prefill_hidden_states,
            salt=user_salt(world, session_id, signer.key),
            host=world.host.address,
            model_id=node.model_id,
        )
        assert verdict.status == "pass", verdict.reason
    changed = [ReplyTranscript(prompt, (*ids[:150], ids[150] + 1, *ids[151:]), 0)]
    bundle = ProofBundle.decode(node.store.get(checkpoints[1].proof_hash))
    salt = user_salt(world, session_id, signer.key)
    assert (
        verify_bundle(bundle, changed, scripted.prefill_hidden_states, salt=salt).status == "fail"
    )

    status = read_session(server.url, world, session_id, signer.key).json()
    assert status["status"] == "settled"
    assert status["settlement"]["tx_hash"] == settled.tx_hash
    assert (status["settlement"]["input_tokens"], status["settlement"]["tokens"]) == (billed, 250)
    assert len(status["checkpoints"]) == 3
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'inferledger_checkpoints_total{state="proved"} 3.0' in metrics
    assert "inferledger_settlement_seconds_count 1.0" in metrics


def test_client_leaving_without_end_is_settled_after_the_grace_period(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    session_id, signer = open_served(world, scripted)
    node, server = start_node(scripted, disconnect_grace=0.5)

    async def chat_and_drop() -> None:
        client = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world)
        )
        await client.chat(HELLO, max_tokens=130)
        await client.close()  # the reply's last receipt went out before its done frame

    asyncio.run(chat_and_drop())
    wait_settled(node, session_id)
    assert node.outbox.settlement(session_id).reason == "disconnect"
    assert_paid_exactly(world, session_id, hello_tokens(scripted), 130)


def test_a_client_returning_within_the_grace_period_keeps_its_session(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    session_id, signer = open_served(world, scripted)
    node, server = start_node(scripted, disconnect_grace=30)

    billed = hello_tokens(scripted)

    async def drop_and_resume() -> tuple[list[int], Settled | SettlementPending | None]:
        first = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world)
        )
        await first.chat(HELLO, max_tokens=40)
        await first.close()
        await asyncio.to_thread(
            wait_until, lambda: session_id not in node.live, "the node to see the disconnect"
        )
        left = node.outbox.settlement(session_id)
        assert left is not None and (left.reason, left.status) == ("disconnect", "pending")
        history = History(
            token_ids=tuple(t.token_id for t in first.tokens),
            input_tokens=first.input_tokens,
            signed=(first.receipts[-1].input_tokens, first.receipts[-1].tokens),
        )
        again = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world), history=history
        )
        assert node.outbox.settlement(session_id) is None  # the return cancelled it
        await again.settle_up()  # nothing owed: returns at once
        reply = await again.chat(HELLO, max_tokens=20)
        await again.end()
        settled = await again.wait_settlement(30)
        await again.close()
        return reply.token_ids, settled

    ids, settled = asyncio.run(drop_and_resume())
    assert len(ids) == 20 and isinstance(settled, Settled), settled
    assert (settled.input_tokens, settled.output_tokens) == (2 * billed, 60)
    assert node.outbox.settlement(session_id).reason == "end"
    assert_paid_exactly(world, session_id, 2 * billed, 60)


def test_request_close_is_answered_with_the_latest_receipt(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    session_id, signer = open_served(world, scripted)
    node, server = start_node(scripted, chain_poll_interval=0.2, disconnect_grace=300)

    async def chat() -> None:
        client = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world)
        )
        await client.chat(HELLO, max_tokens=70)
        await client.close()

    asyncio.run(chat())
    wait_until(lambda: session_id not in node.live, "the node to see the disconnect")
    world.contracts.marketplace.request_close(world.user, session_id)
    wait_settled(node, session_id)
    assert node.outbox.settlement(session_id).reason == "close_requested"
    assert_paid_exactly(world, session_id, hello_tokens(scripted), 70)


def test_sessions_about_to_expire_are_settled(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    model_id = serve_model(world, scripted, keccak(text=scripted.name), PRICE, INPUT_PRICE)
    session_id, signer = open_priced(world, model_id, duration=3600)
    node, server = start_node(
        scripted, chain_poll_interval=0.2, disconnect_grace=300, settle_before_expiry=600
    )

    async def chat_until_expiry_nears() -> tuple[SessionClient, Any]:
        client = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world)
        )
        await client.chat(HELLO, max_tokens=30)
        # The node stops min(settle_before_expiry, duration / 10) = 360 s before expiry.
        assert client.ready.settles_at == client.ready.expires_at - 360
        world.chain.time_travel(3600 - 300)
        # The live connection is stopped and told: session_end, then what was paid.
        await asyncio.wait_for(client.wait_session_end(), 60)
        settled = await client.wait_settlement(30)
        await client.close()
        return client, settled

    client, settled = asyncio.run(chat_until_expiry_nears())
    billed = hello_tokens(scripted)
    assert client.ended is not None
    assert (client.ended.receipted_input_tokens, client.ended.receipted_output_tokens) == (
        billed,
        30,
    )
    assert isinstance(settled, Settled), settled
    assert (settled.input_tokens, settled.output_tokens) == (billed, 30)
    assert node.outbox.settlement(session_id).reason == "expiry"
    assert_paid_exactly(world, session_id, billed, 30)


def _write_prover(tmp_path: Path, *flags: str) -> Path:
    script = tmp_path / f"prover{'-'.join(flags)}.sh"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} {EXAMPLE_PROVER} {' '.join(flags)}\n")
    script.chmod(0o755)
    return script


@pytest.mark.parametrize("flag", ["--crash-on-prove", "--hang-on-prove"])
def test_a_prover_failing_mid_session_never_blocks_payment(
    world: DevWorld, scripted: Backend, start_node: NodeFactory, tmp_path: Path, flag: str
) -> None:
    session_id, signer = open_served(world, scripted)
    prover = _write_prover(tmp_path, flag)
    node, server = start_node(
        scripted, prover="external", external_prover=prover, external_prover_timeout=1.0
    )
    assert node.ready and node.preflight.get("prover").ok  # the handshake works
    _, settled, _ = asyncio.run(_chat_and_end(world, server.ws_url, session_id, signer.key, 120))

    billed = hello_tokens(scripted)
    assert isinstance(settled, Settled), settled
    assert (settled.input_tokens, settled.output_tokens) == (billed, 120)
    assert_paid_exactly(world, session_id, billed, 120)
    checkpoints = node.outbox.checkpoints(session_id)
    assert [(cp.prover, cp.unproven) for cp in checkpoints] == [("commitment", True)] * 2
    assert all("external prover failed" in (cp.prover_error or "") for cp in checkpoints)
    assert node.metrics.prover_failures._value.get() == 2


def test_the_external_prover_attests_every_checkpoint(
    world: DevWorld, scripted: Backend, start_node: NodeFactory, tmp_path: Path
) -> None:
    session_id, signer = open_served(world, scripted)
    node, server = start_node(scripted, prover="external", external_prover=_write_prover(tmp_path))
    asyncio.run(_chat_and_end(world, server.ws_url, session_id, signer.key, 50))
    (checkpoint,) = node.outbox.checkpoints(session_id)
    bundle = ProofBundle.decode(node.store.get(checkpoint.proof_hash))
    assert bundle.prover == "external" and len(bundle.attestation) == 32
    assert_paid_exactly(world, session_id, hello_tokens(scripted), 50)


def test_missing_external_prover_fails_preflight_and_degraded_nodes_still_settle(
    world: DevWorld, scripted: Backend, start_node: NodeFactory, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-prover"
    strict, _ = start_node(scripted, prover="external", external_prover=missing)
    line = strict.preflight.get("prover").line()
    assert str(missing) in line and "INFERLEDGER_EXTERNAL_PROVER" in line and "fix:" in line
    assert not strict.ready

    session_id, signer = open_served(world, scripted)
    node, server = start_node(
        scripted, prover="external", external_prover=missing, allow_degraded=True
    )
    assert node.ready
    _, settled, _ = asyncio.run(_chat_and_end(world, server.ws_url, session_id, signer.key, 150))
    billed = hello_tokens(scripted)
    assert isinstance(settled, Settled), settled
    assert (settled.input_tokens, settled.output_tokens) == (billed, 150)
    assert_paid_exactly(world, session_id, billed, 150)
    checkpoints = node.outbox.checkpoints(session_id)
    assert {(cp.prover, cp.unproven) for cp in checkpoints} == {("commitment", True)}
    # Degraded: each unproven checkpoint counts as a prover failure, none as proved.
    assert node.metrics.prover_failures._value.get() == len(checkpoints) == 2
    metrics = httpx.get(server.url + "/metrics").text
    assert 'inferledger_checkpoints_total{state="unproven"} 2.0' in metrics
    assert 'state="proved"' not in metrics
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    assert any("prover" in problem for problem in health.json()["problems"])


def test_a_nonce_taken_by_another_transaction_of_the_host_key_is_recovered(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    session_id, signer = open_served(world, scripted, interval=50)
    node, server = start_node(scripted, onchain_checkpoints="always")

    async def run() -> Settled | SettlementPending | None:
        client = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world)
        )
        await client.chat(HELLO, max_tokens=50)
        # The worker has sent a checkpoint and cached its next nonce; take that nonce.
        await asyncio.to_thread(
            wait_until,
            lambda: [c.status for c in node.outbox.checkpoints(session_id)] == ["confirmed"],
            "the first checkpoint on chain",
        )
        await asyncio.to_thread(world.contracts.nodes.update_url, world.host, "ws://elsewhere")
        await client.chat(HELLO, max_tokens=30)
        await client.end()
        settled = await client.wait_settlement(30)
        await client.close()
        return settled

    settled = asyncio.run(run())
    billed = hello_tokens(scripted)
    assert isinstance(settled, Settled), settled
    assert (settled.input_tokens, settled.output_tokens) == (2 * billed, 80)
    assert_paid_exactly(world, session_id, 2 * billed, 80)
    statuses = [c.status for c in node.outbox.checkpoints(session_id)]
    assert statuses == ["settled", "settled"]


def test_the_node_releases_its_paid_amounts_after_the_dispute_window(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    """Once a settled session's dispute window is over, the host's node gives its cap the
    room back by itself; a session under dispute stays counted until the dispute ends."""
    c = world.contracts
    first, first_signer = open_served(world, scripted)
    second, second_signer = open_priced(world, keccak(text=scripted.name))
    node, server = start_node(scripted, chain_poll_interval=0.2)
    for session_id, signer in ((first, first_signer), (second, second_signer)):
        asyncio.run(_chat_and_end(world, server.ws_url, session_id, signer.key, 30))
        wait_settled(node, session_id)
    paid = {sid: c.marketplace.dispute_facts(sid).paid for sid in (first, second)}
    open_dispute(world, second)  # a challenger holds the second one open
    exposure = c.nodes.get_host(world.host.address).exposure
    assert exposure >= sum(paid.values()) > 0
    world.chain.time_travel(c.disputes.dispute_window() + 1)
    # The node's books, not the chain: the chain shows the release before the node has its
    # receipt back and has written it down.
    wait_until(
        lambda: (
            node.state.unreleased_sessions() == [second]
            and node.metrics.exposure_released._value.get() == 1
        ),
        "the node to release the first session and record it",
    )
    assert c.disputes.is_released(first)
    assert c.nodes.get_host(world.host.address).exposure == exposure - paid[first]
    assert not c.disputes.is_released(second)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "inferledger_exposure_released_total 1.0" in metrics
    assert 'action="release_exposure"' not in metrics  # no transaction tried and failed
