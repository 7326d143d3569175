"""The acceptance path of the node: a real model, a real WebSocket, receipts that pay on chain."""

from __future__ import annotations

import asyncio

from conftest import NodeFactory, serve_model
from inferledger.chain.devchain import DevWorld
from inferledger.chain.receipts import Receipt, check_receipt_signature, receipt_digest
from inferledger.inference import Backend
from inferledger.sdk.wire import SessionClient
from support import open_session


def test_smollm_session_streams_100_tokens_with_receipts_that_settle_on_chain(
    world: DevWorld, smollm: Backend, start_node: NodeFactory
) -> None:
    c = world.contracts
    sha256 = bytes.fromhex(smollm.weights_sha256)  # type: ignore[attr-defined]
    model_id = serve_model(world, smollm, sha256)
    session_id, signer = open_session(world, model_id=model_id, proof_interval=50)
    node, server = start_node(smollm)
    assert node.ready, node.preflight.lines()
    question = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]

    async def run() -> tuple[str, list[int], str, dict[str, object]]:
        client = await SessionClient.connect(server.ws_url, session_id, signer.key)
        reply = await client.chat(question, max_tokens=120, temperature=0)
        ended = await client.end()
        return reply.text, reply.token_ids, reply.finish_reason, ended

    text, token_ids, _reason, ended = asyncio.run(run())
    assert len(token_ids) >= 100, f"SmolLM2 stopped after {len(token_ids)} tokens"
    assert text.strip()
    assert ended["tokens_receipted"] == len(token_ids)

    receipts = node.state.receipts(session_id)
    assert [r.tokens for r in receipts][:2] == [50, 100]
    domain = c.marketplace.domain()
    for r in receipts:
        receipt = Receipt(session_id, r.tokens, r.proof_hash)
        assert receipt_digest(domain, receipt) == c.marketplace.receipt_digest(
            session_id, r.tokens, r.proof_hash
        )
        check_receipt_signature(domain, receipt, r.signature, signer.address)
    last = receipts[-1]
    settled = c.marketplace.complete_session(
        world.host, session_id, last.tokens, last.proof_hash, "", last.signature
    )
    assert settled.tokens == len(token_ids)
    assert settled.host_amount + settled.fee + settled.refund == 2_000_000
