"""Checkpoints and settlement end to end, with the scripted backend on both chains.

Every test ends by checking the money: the deposit is split exactly into host, treasury and
refund by the tokens the user signed for, and the session is no longer open.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import httpx
import pytest
from eth_utils import keccak
from node_support import NodeFactory, expect, serve_model

from inferledger.chain.devchain import DevWorld
from inferledger.chain.units import settlement_split, usdc
from inferledger.inference import Backend
from inferledger.node.node import Node
from inferledger.proofs.bundle import ProofBundle
from inferledger.proofs.verify import ReplyTranscript, verify_bundle
from inferledger.sdk.wire import SessionClient
from support import open_session

HELLO = [{"role": "user", "content": "hello"}]
DEPOSIT = usdc("2")
PRICE = 2_000_000_000  # $0.002 per token
EXAMPLE_PROVER = Path(__file__).resolve().parents[2] / "examples" / "provers" / "hash_prover.py"


def _open(world: DevWorld, backend: Backend, interval: int = 100) -> tuple[int, object]:
    model_id = serve_model(world, backend, keccak(text=backend.name), PRICE)
    return open_session(
        world, model_id=model_id, deposit=DEPOSIT, price=PRICE, proof_interval=interval
    )


def assert_paid_exactly(world: DevWorld, session_id: int, tokens: int) -> None:
    """The session is settled at ``tokens`` and every base unit of the deposit is accounted."""
    info = world.contracts.marketplace.get_session(session_id)
    assert info.is_settled, f"session {session_id} still open"
    assert info.tokens_paid == tokens
    split = settlement_split(DEPOSIT, tokens, PRICE, info.fee_bps)
    assert split.host + split.fee + split.refund == DEPOSIT
    assert split.fee == split.gross // 10 and split.host == split.gross - split.fee


def wait_settled(node: Node, session_id: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        settlement = node.outbox.settlement(session_id)
        if settlement is not None and settlement.status == "settled":
            return
        time.sleep(0.05)
    raise AssertionError(f"session {session_id} not settled in {timeout}s: {settlement}")


async def _chat_and_end(
    url: str, session_id: int, key: bytes, max_tokens: int
) -> tuple[list[int], dict[str, object] | None, list[bytes]]:
    client = await SessionClient.connect(url, session_id, key, expect=expect(world))
    reply = await client.chat(HELLO, max_tokens=max_tokens)
    await client.end()
    settled = await client.wait_settlement(30)
    await client.close()
    return reply.token_ids, settled, [r.proof_hash for r in client.receipts]


def test_end_settles_exactly_and_the_stored_proofs_verify(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    host_before = world.contracts.earnings.balance_of(
        world.host.address, world.contracts.token.address
    )
    session_id, signer = _open(world, scripted)
    node, server = start_node(scripted)
    ids, settled, proof_hashes = asyncio.run(
        _chat_and_end(server.ws_url, session_id, signer.key, 250)
    )

    assert len(ids) == 250
    assert settled is not None and settled["type"] == "settled", settled
    split = settlement_split(DEPOSIT, 250, PRICE, 1000)
    assert (settled["tokens"], settled["host_amount"], settled["fee"], settled["refund"]) == (
        250,
        split.host,
        split.fee,
        split.refund,
    )
    assert_paid_exactly(world, session_id, 250)
    c = world.contracts
    assert c.earnings.balance_of(world.host.address, c.token.address) - host_before == split.host

    checkpoints = node.outbox.checkpoints(session_id)
    assert [(cp.token_start, cp.token_end) for cp in checkpoints] == [
        (0, 100),
        (100, 200),
        (200, 250),
    ]
    assert {cp.status for cp in checkpoints} == {"settled"}
    assert [cp.proof_hash for cp in checkpoints] == proof_hashes
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
            host=world.host.address,
            model_id=node.model_id,
        )
        assert verdict.status == "pass", verdict.reason
    changed = [ReplyTranscript(prompt, (*ids[:150], ids[150] + 1, *ids[151:]), 0)]
    bundle = ProofBundle.decode(node.store.get(checkpoints[1].proof_hash))
    assert verify_bundle(bundle, changed, scripted.prefill_hidden_states).status == "fail"

    status = httpx.get(f"{server.url}/v1/sessions/{session_id}").json()
    assert status["status"] == "settled"
    assert status["settlement"]["tx_hash"] == settled["tx_hash"]
    assert len(status["checkpoints"]) == 3
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'inferledger_checkpoints_total{state="proved"} 3.0' in metrics
    assert "inferledger_settlement_seconds_count 1.0" in metrics


def test_client_leaving_without_end_is_settled_after_the_grace_period(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    session_id, signer = _open(world, scripted)
    node, server = start_node(scripted, disconnect_grace=0.5)

    async def chat_and_drop() -> None:
        client = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world)
        )
        await client.chat(HELLO, max_tokens=130)
        await asyncio.sleep(0.2)  # let the tail receipt land
        await client.close()

    asyncio.run(chat_and_drop())
    wait_settled(node, session_id)
    assert node.outbox.settlement(session_id).reason == "disconnect"
    assert_paid_exactly(world, session_id, 130)


def test_a_client_returning_within_the_grace_period_keeps_its_session(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    session_id, signer = _open(world, scripted)
    node, server = start_node(scripted, disconnect_grace=30)

    async def drop_and_resume() -> tuple[list[int], dict[str, object] | None]:
        first = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world)
        )
        await first.chat(HELLO, max_tokens=40)
        await asyncio.sleep(0.2)
        await first.close()
        await asyncio.sleep(0.2)
        again = await SessionClient.connect(
            server.ws_url, session_id, signer.key, transcript=first.transcript
        )
        reply = await again.chat(HELLO, max_tokens=20)
        await again.end()
        return reply.token_ids, await again.wait_settlement(30)

    ids, settled = asyncio.run(drop_and_resume())
    assert len(ids) == 20 and settled is not None and settled["tokens"] == 60
    assert node.outbox.settlement(session_id).reason == "end"
    assert_paid_exactly(world, session_id, 60)


def test_request_close_is_answered_with_the_latest_receipt(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    session_id, signer = _open(world, scripted)
    node, server = start_node(scripted, chain_poll_interval=0.2, disconnect_grace=300)

    async def chat() -> None:
        client = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world)
        )
        await client.chat(HELLO, max_tokens=70)
        await asyncio.sleep(0.2)
        await client.close()

    asyncio.run(chat())
    world.contracts.marketplace.request_close(world.user, session_id)
    wait_settled(node, session_id)
    assert node.outbox.settlement(session_id).reason == "close_requested"
    assert_paid_exactly(world, session_id, 70)


def test_sessions_about_to_expire_are_settled(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    model_id = serve_model(world, scripted, keccak(text=scripted.name), PRICE)
    session_id, signer = open_session(
        world, model_id=model_id, deposit=DEPOSIT, price=PRICE, proof_interval=100, duration=3600
    )
    node, server = start_node(
        scripted, chain_poll_interval=0.2, disconnect_grace=300, settle_before_expiry=600
    )

    async def chat_until_expiry_nears() -> None:
        client = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world)
        )
        await client.chat(HELLO, max_tokens=30)
        world.chain.time_travel(3600 - 500)
        await asyncio.to_thread(wait_settled, node, session_id)
        await client.close()

    asyncio.run(chat_until_expiry_nears())
    assert node.outbox.settlement(session_id).reason == "expiry"
    assert_paid_exactly(world, session_id, 30)


def _write_prover(tmp_path: Path, *flags: str) -> Path:
    script = tmp_path / f"prover{'-'.join(flags)}.sh"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} {EXAMPLE_PROVER} {' '.join(flags)}\n")
    script.chmod(0o755)
    return script


@pytest.mark.parametrize("flag", ["--crash-on-prove", "--hang-on-prove"])
def test_a_prover_failing_mid_session_never_blocks_payment(
    world: DevWorld, scripted: Backend, start_node: NodeFactory, tmp_path: Path, flag: str
) -> None:
    session_id, signer = _open(world, scripted)
    prover = _write_prover(tmp_path, flag)
    node, server = start_node(
        scripted, prover="external", external_prover=prover, external_prover_timeout=1.0
    )
    assert node.ready and node.preflight.get("prover").ok  # the handshake works
    _, settled, _ = asyncio.run(_chat_and_end(server.ws_url, session_id, signer.key, 120))

    assert settled is not None and settled["tokens"] == 120
    assert_paid_exactly(world, session_id, 120)
    checkpoints = node.outbox.checkpoints(session_id)
    assert [(cp.prover, cp.unproven) for cp in checkpoints] == [("commitment", True)] * 2
    assert all("external prover failed" in (cp.prover_error or "") for cp in checkpoints)
    assert node.metrics.prover_failures._value.get() == 2


def test_the_external_prover_attests_every_checkpoint(
    world: DevWorld, scripted: Backend, start_node: NodeFactory, tmp_path: Path
) -> None:
    session_id, signer = _open(world, scripted)
    node, server = start_node(scripted, prover="external", external_prover=_write_prover(tmp_path))
    asyncio.run(_chat_and_end(server.ws_url, session_id, signer.key, 50))
    (checkpoint,) = node.outbox.checkpoints(session_id)
    bundle = ProofBundle.decode(node.store.get(checkpoint.proof_hash))
    assert bundle.prover == "external" and len(bundle.attestation) == 32
    assert_paid_exactly(world, session_id, 50)


def test_missing_external_prover_fails_preflight_and_degraded_nodes_still_settle(
    world: DevWorld, scripted: Backend, start_node: NodeFactory, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-prover"
    strict, _ = start_node(scripted, prover="external", external_prover=missing)
    line = strict.preflight.get("prover").line()
    assert str(missing) in line and "INFERLEDGER_EXTERNAL_PROVER" in line and "fix:" in line
    assert not strict.ready

    session_id, signer = _open(world, scripted)
    node, server = start_node(
        scripted, prover="external", external_prover=missing, allow_degraded=True
    )
    assert node.ready
    _, settled, _ = asyncio.run(_chat_and_end(server.ws_url, session_id, signer.key, 150))
    assert settled is not None and settled["tokens"] == 150
    assert_paid_exactly(world, session_id, 150)
    assert {(cp.prover, cp.unproven) for cp in node.outbox.checkpoints(session_id)} == {
        ("commitment", True)
    }


def test_a_nonce_taken_by_another_transaction_of_the_host_key_is_recovered(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    session_id, signer = _open(world, scripted, interval=50)
    node, server = start_node(scripted, onchain_checkpoints="always")

    async def run() -> dict[str, object] | None:
        client = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world)
        )
        await client.chat(HELLO, max_tokens=50)
        # The worker has sent a checkpoint and cached its next nonce; take that nonce.
        for _ in range(200):
            if [c.status for c in node.outbox.checkpoints(session_id)] == ["confirmed"]:
                break
            await asyncio.sleep(0.05)
        await asyncio.to_thread(world.contracts.nodes.update_url, world.host, "ws://elsewhere")
        await client.chat(HELLO, max_tokens=30)
        await client.end()
        return await client.wait_settlement(30)

    settled = asyncio.run(run())
    assert settled is not None and settled["tokens"] == 80, settled
    assert_paid_exactly(world, session_id, 80)
    statuses = [c.status for c in node.outbox.checkpoints(session_id)]
    assert statuses == ["settled", "settled"]
