"""The acceptance path of issue 4: the real SmolLM2, real WebSockets, proofs, settlement.

A 2 USDC session at $0.002/token streams at least 200 tokens with a checkpoint every 100; the
node settles on `end`, the deposit splits exactly 90/10/refund, and every stored proof
verifies by one prefill, while a changed token fails.
"""

from __future__ import annotations

import asyncio

import httpx
from node_support import NodeFactory, expect, serve_model
from test_node_settlement import DEPOSIT, PRICE, assert_paid_exactly

from inferledger.chain.devchain import DevWorld
from inferledger.chain.receipts import Receipt, check_receipt_signature
from inferledger.chain.units import settlement_split
from inferledger.inference import Backend
from inferledger.proofs.bundle import ProofBundle
from inferledger.proofs.verify import ReplyTranscript, verify_bundle
from inferledger.sdk.wire import SessionClient
from support import open_session

STORY = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
MORE = [{"role": "user", "content": "Continue the story with a storm and a rescue."}]


def test_smollm_session_of_200_tokens_settles_90_10_and_its_proofs_verify(
    world: DevWorld, smollm: Backend, start_node: NodeFactory
) -> None:
    c = world.contracts
    sha256 = bytes.fromhex(smollm.weights_sha256)  # type: ignore[attr-defined]
    model_id = serve_model(world, smollm, sha256, PRICE)
    session_id, signer = open_session(
        world, model_id=model_id, deposit=DEPOSIT, price=PRICE, proof_interval=100
    )
    node, server = start_node(smollm)
    assert node.ready, node.preflight.lines()
    assert node.prover.name == "activation"
    host_before = c.earnings.balance_of(world.host.address, c.token.address)
    treasury_before = c.marketplace.treasury_balance()

    async def run() -> tuple[list[ReplyTranscript], dict[str, object] | None]:
        client = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world)
        )
        replies = []
        for question in (STORY, MORE):  # SmolLM2 may end its story before 200 tokens
            first = client.received
            reply = await client.chat(question, max_tokens=230 - first, temperature=0)
            prompt = tuple(smollm.tokenize_chat(question))
            replies.append(ReplyTranscript(prompt, tuple(reply.token_ids), first))
            if client.received >= 200:
                break
        await client.end()
        return replies, await client.wait_settlement(60)

    replies, settled = asyncio.run(run())
    tokens = replies[-1].first_token + len(replies[-1].reply_ids)
    assert tokens >= 200, f"SmolLM2 stopped after {tokens} tokens"
    assert settled is not None and settled["type"] == "settled", settled

    split = settlement_split(DEPOSIT, tokens, PRICE, 1000)
    assert split.gross == tokens * 2000  # $0.002 = 2000 base units per token
    assert (settled["host_amount"], settled["fee"], settled["refund"]) == (
        split.host,
        split.fee,
        split.refund,
    )
    assert c.earnings.balance_of(world.host.address, c.token.address) - host_before == split.host
    assert c.marketplace.treasury_balance() - treasury_before == split.fee
    assert_paid_exactly(world, session_id, tokens)

    receipts = node.state.receipts(session_id)
    assert [r.tokens for r in receipts][:2] == [100, 200] and receipts[-1].tokens == tokens
    for r in receipts:
        receipt = Receipt(session_id, r.tokens, r.proof_hash)
        check_receipt_signature(c.marketplace.domain(), receipt, r.signature, signer.address)

    bundles = []
    for checkpoint in node.outbox.checkpoints(session_id):
        data = httpx.get(f"{server.url}/v1/proofs/0x{checkpoint.proof_hash.hex()}").content
        bundle = ProofBundle.decode(data)
        assert bundle.prover == "activation" and not bundle.unproven
        verdict = verify_bundle(
            bundle,
            replies,
            smollm.prefill_hidden_states,
            host=world.host.address,
            model_id=model_id,
        )
        assert verdict.status == "pass", verdict.reason
        bundles.append(bundle)
    proof_bytes = sum(len(p) for b in bundles for s in b.segments for p in s.activation_proofs)
    assert proof_bytes / tokens <= 10  # the target, prompt chunks included

    first = replies[0]
    changed_ids = list(first.reply_ids)
    changed_ids[150 if len(changed_ids) > 150 else -1] += 1
    changed = [ReplyTranscript(first.prompt_ids, tuple(changed_ids), 0), *replies[1:]]
    verdicts = [verify_bundle(b, changed, smollm.prefill_hidden_states) for b in bundles]
    assert "fail" in {v.status for v in verdicts}
