"""Background verification: a share of the checkpoints re-run by prefill with the local
model; a failure is a log line, a metric and an entry in /v1/inferledger/sessions."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import httpx
import numpy as np
import pytest
from gateway_support import HELLO, MODEL
from node_support import wait_until

from inferledger.config import ConfigError
from inferledger.inference.scripted import ScriptedBackend

if TYPE_CHECKING:
    from sdk_support import Market

    from conftest import GatewayFactory


class WrongModel(ScriptedBackend):
    """A local model whose activations differ from the host's: every proof fails."""

    def prefill_hidden_states(self, token_ids: Sequence[int]) -> np.ndarray:
        return super().prefill_hidden_states(token_ids) + 1.0


def verified(run: object, count: int) -> list[dict[str, object]]:
    gateway = run.gateway  # type: ignore[attr-defined]
    wait_until(lambda: len(gateway.view()["verification"]["checked"]) >= count, "verification")
    return gateway.view()["verification"]["checked"]


def test_every_checkpoint_of_an_honest_host_passes(
    market: Market, start_gateway: GatewayFactory
) -> None:
    run = start_gateway(gateway_verify_share=1, local_model=ScriptedBackend())
    reply = run.openai().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12)
    assert reply.usage is not None
    proofs = reply.usage.model_extra["inferledger"]["proof_hashes"]
    assert proofs  # at least the bundle at the end of the reply
    checked = verified(run, len(proofs))
    assert [c["proof_hash"] for c in checked] == proofs
    assert {c["status"] for c in checked} == {"pass"}


def test_a_failed_check_is_logged_counted_and_listed(
    market: Market, start_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "inferledger.gateway")
    run = start_gateway(gateway_verify_share=1, local_model=WrongModel())
    reply = run.openai().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12)
    assert reply.usage is not None
    (checked,) = verified(run, 1)
    assert checked["status"] == "fail" and checked["host"] == market.world.host.address
    assert checked["session_id"] == reply.usage.model_extra["inferledger"]["session_id"]
    assert any("FAILED verification" in r.getMessage() for r in caplog.records)
    metrics = httpx.get(run.server.url.removesuffix("/v1") + "/metrics").text
    assert 'inferledger_gateway_checkpoints_verified_total{status="fail"} 1.0' in metrics


def test_verifying_without_a_local_model_refuses_to_start(
    market: Market, start_gateway: GatewayFactory
) -> None:
    with pytest.raises(ConfigError, match="gateway_verify_share"):
        start_gateway(gateway_verify_share=0.5)


def test_auto_disputes_without_background_verification_refuse_to_start(
    market: Market, start_gateway: GatewayFactory
) -> None:
    # Disputes come from failed re-runs: with no share verified there would never be one.
    with pytest.raises(ConfigError, match=r"gateway_auto_dispute.*gateway_verify_share above 0"):
        start_gateway(gateway_auto_dispute=True)
