"""The acceptance path: the real SmolLM2, real WebSockets, proofs, settlement.

A 2 USDC session at $0.0005 per prompt token and $0.002 per reply token streams at least
200 tokens with a checkpoint every 100; the node settles on `end`, the deposit splits
exactly 90/10/refund over both counts, and every stored proof verifies by one prefill of
the float32 transformers model, while a changed token fails. The host runs transformers,
then llama.cpp (the same GGUF, judged by the llama_cpp profile).
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from node_support import NodeFactory, expect, serve_model, user_salt
from test_node_settlement import DEPOSIT, INPUT_PRICE, PRICE, assert_paid_exactly, open_priced

from inferledger.chain.devchain import DevWorld
from inferledger.chain.receipts import Receipt, check_receipt_signature
from inferledger.chain.units import settlement_split
from inferledger.inference import Backend
from inferledger.proofs.bundle import ProofBundle
from inferledger.proofs.sampling import Sampling
from inferledger.proofs.verify import ReplyTranscript, VerifierModel, verify_bundle
from inferledger.protocol.server import Settled, SettlementPending
from inferledger.sdk.wire import SessionClient

STORY = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
MORE = [{"role": "user", "content": "Continue the story with a storm and a rescue."}]


PROFILE_OF_HOST = {"transformers": "fp32", "llama_cpp": "llama_cpp"}


@pytest.fixture(params=sorted(PROFILE_OF_HOST))
def host_model(request: pytest.FixtureRequest, smollm: Backend) -> Backend:
    """The model the host serves: transformers (the fixture the verifier uses too), or
    llama.cpp over the same weights."""
    if request.param == "transformers":
        return smollm
    backend: Backend = request.getfixturevalue("llama")
    return backend


def test_smollm_session_of_200_tokens_settles_90_10_and_its_proofs_verify(
    world: DevWorld, host_model: Backend, smollm: Backend, start_node: NodeFactory
) -> None:
    c = world.contracts
    sha256 = bytes.fromhex(host_model.weights_sha256)  # type: ignore[attr-defined]
    model_id = serve_model(world, host_model, sha256, PRICE, INPUT_PRICE)
    session_id, signer = open_priced(world, model_id)
    node, server = start_node(host_model)
    assert node.ready, node.preflight.lines()
    assert node.prover.name == "activation"
    host_before = c.earnings.balance_of(world.host.address, c.token.address)
    treasury_before = c.marketplace.treasury_balance()

    async def run() -> tuple[list[ReplyTranscript], Settled | SettlementPending | None]:
        client = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world)
        )
        replies = []
        # Greedy, then sampled with the user's seed: both kinds of reply are checkable.
        asked = [(STORY, Sampling()), (MORE, Sampling(temperature=0.7, top_p=0.95, seed=1234))]
        for question, sampling in asked:  # SmolLM2 may end its story before 200 tokens
            first = client.received
            reply = await client.chat(
                question,
                max_tokens=230 - first,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                seed=sampling.seed,
            )
            prompt = tuple(smollm.tokenize_chat(question))
            assert reply.prompt_tokens == len(prompt)  # billed what the model prefilled
            replies.append(ReplyTranscript(prompt, tuple(reply.token_ids), first, sampling))
            if client.received >= 200:
                break
        await client.end()
        settled = await client.wait_settlement(60)
        await client.close()
        return replies, settled

    replies, settled = asyncio.run(run())
    tokens = replies[-1].first_token + len(replies[-1].reply_ids)
    prompt_tokens = sum(len(r.prompt_ids) for r in replies)
    assert tokens >= 200, f"SmolLM2 stopped after {tokens} tokens"
    assert isinstance(settled, Settled), settled
    assert (settled.input_tokens, settled.output_tokens) == (prompt_tokens, tokens)

    split = settlement_split(DEPOSIT, prompt_tokens, tokens, INPUT_PRICE, PRICE, 1000)
    # $0.002 = 2000 base units per reply token, $0.0005 = 500 per prompt token
    assert split.gross == tokens * 2000 + prompt_tokens * 500
    assert (settled.host_amount, settled.fee, settled.refund) == (
        split.host,
        split.fee,
        split.refund,
    )
    assert c.earnings.balance_of(world.host.address, c.token.address) - host_before == split.host
    assert c.marketplace.treasury_balance() - treasury_before == split.fee
    assert_paid_exactly(world, session_id, prompt_tokens, tokens)

    receipts = node.state.receipts(session_id)
    outputs = [r.tokens for r in receipts]
    # Every 16 tokens at most, and at each bundle (100, 200) and the end of each reply.
    assert {100, 200} <= set(outputs) and outputs[-1] == tokens
    assert all(b - a <= 16 for a, b in zip([0, *outputs], outputs, strict=False))
    assert receipts[-1].input_tokens == prompt_tokens
    for r in receipts:
        receipt = Receipt(session_id, r.input_tokens, r.tokens, r.proof_hash)
        check_receipt_signature(c.marketplace.domain(), receipt, r.signature, signer.address)

    bundles, salt = [], user_salt(world, session_id, signer.key)
    for checkpoint in node.outbox.checkpoints(session_id):
        data = httpx.get(f"{server.url}/v1/proofs/0x{checkpoint.proof_hash.hex()}").content
        bundle = ProofBundle.decode(data)
        assert bundle.prover == "activation" and not bundle.unproven
        assert (bundle.backend, bundle.dtype) == (host_model.engine, host_model.dtype)
        verdict = verify_bundle(
            bundle,
            replies,
            VerifierModel.of(smollm),
            salt=salt,
            host=world.host.address,
            model_id=model_id,
        )
        assert verdict.status == "pass", verdict.reason
        assert verdict.profile == PROFILE_OF_HOST[host_model.engine]
        bundles.append(bundle)
    proof_bytes = sum(len(p) for b in bundles for s in b.segments for p in s.activation_proofs)
    assert proof_bytes / tokens <= 10  # the target, prompt chunks included

    first = replies[0]
    changed_ids = list(first.reply_ids)
    changed_ids[150 if len(changed_ids) > 150 else -1] += 1
    changed = [
        ReplyTranscript(first.prompt_ids, tuple(changed_ids), 0, first.sampling),
        *replies[1:],
    ]
    model = VerifierModel.of(smollm)
    verdicts = [verify_bundle(b, changed, model, salt=salt) for b in bundles]
    assert "fail" in {v.status for v in verdicts}
