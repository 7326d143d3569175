"""The one real-model test: SmolLM2 answers an ``openai`` client through the gateway,
and the gateway re-verifies every checkpoint of it by prefill with its own copy."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from node_support import serve_model, wait_until

from inferledger.inference import Backend

if TYPE_CHECKING:
    from sdk_support import Market, NodeFactory

    from conftest import GatewayFactory


def test_smollm_answers_through_the_gateway_and_its_proofs_verify(
    market: Market, start_gateway: GatewayFactory, start_node: NodeFactory, smollm: Backend
) -> None:
    world = market.world
    if not world.chain.is_embedded:
        pytest.skip("one chain is enough for the slow model (the scripted tests cover both)")
    serve_model(world, smollm, bytes.fromhex(smollm.weights_sha256))  # type: ignore[attr-defined]
    _node, server = start_node(smollm)
    world.contracts.nodes.update_url(world.host, server.url)
    run = start_gateway(gateway_verify_share=1, local_model=smollm)

    reply = run.openai().chat.completions.create(
        model=smollm.name,
        messages=[{"role": "user", "content": "What is a ledger? Answer in one sentence."}],
        max_tokens=24,
        temperature=0,
    )

    text = reply.choices[0].message.content
    assert text and any(c.isalpha() for c in text)
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 24
    proofs = reply.usage.model_extra["inferledger"]["proof_hashes"]
    assert proofs
    gateway = run.gateway
    wait_until(
        lambda: len(gateway.view()["verification"]["checked"]) >= len(proofs),
        "the checkpoints to be re-verified",
        timeout=120,
    )
    assert {c["status"] for c in gateway.view()["verification"]["checked"]} == {"pass"}
