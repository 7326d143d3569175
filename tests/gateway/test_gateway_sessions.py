"""Sessions managed for the user: reused until the deposit runs low, closed when idle,
and closed at the next start when a gateway was killed with sessions open."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway_support import HELLO, MODEL
from node_support import wait_until

if TYPE_CHECKING:
    from sdk_support import Market

    from conftest import GatewayFactory


def session_of(reply: object) -> int:
    return reply.usage.model_extra["inferledger"]["session_id"]  # type: ignore[attr-defined]


def test_a_session_is_reused_until_its_deposit_runs_low(
    market: Market, start_gateway: GatewayFactory
) -> None:
    # 0.25 USDC; each request may cost up to 0.0895 (its prompt bound and 20 tokens) and
    # costs about 0.055, so the fourth no longer fits the first session.
    run = start_gateway(gateway_deposit="0.25")
    client = run.openai()
    ids = [
        session_of(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=20))
        for _ in range(4)
    ]
    assert ids[0] == ids[1] == ids[2] != ids[3]
    wait_until(lambda: run.gateway.pool.settlements, "the spent session to be closed")
    (retired,) = run.gateway.pool.settlements
    assert retired.session_id == ids[0] and retired.settled
    assert retired.output_tokens == 60 and retired.refund > 0
    assert retired.refund == 250_000 - retired.host_amount - retired.fee
    assert [s["session_id"] for s in run.gateway.view()["sessions"]] == [ids[3]]


def test_an_idle_session_is_closed_and_its_deposit_refunded(
    market: Market, start_gateway: GatewayFactory
) -> None:
    run = start_gateway(gateway_idle_close=0.3)
    user = run.client.address
    assert user is not None
    balance = market.world.contracts.token.balance_of(user)
    reply = run.openai().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
    wait_until(lambda: run.gateway.pool.settlements, "the idle session to be closed")
    (closed,) = run.gateway.pool.settlements
    assert closed.session_id == session_of(reply) and closed.settled
    assert run.gateway.view()["sessions"] == []
    paid = closed.host_amount + closed.fee
    assert market.world.contracts.token.balance_of(user) == balance - paid


def test_sessions_a_killed_gateway_left_open_are_closed_at_the_next_start(
    market: Market, start_gateway: GatewayFactory, tmp_path: object
) -> None:
    first = start_gateway(state=tmp_path / "state")  # type: ignore[operator]
    reply = first.openai().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
    spent = first.gateway.ledger.total
    # Killed: the process is gone with its session open; only the record on disk remains.
    for pooled in first.gateway.pool.sessions.values():
        pooled.session.detach()
    first.gateway.pool.sessions.clear()
    first.stop()
    left_open = market.world.contracts.marketplace.get_session(session_of(reply))
    assert left_open.is_open

    second = start_gateway(state=tmp_path / "state")  # type: ignore[operator]

    wait_until(second.gateway.reconciled.is_set, "the leftover sessions to be closed")
    (closed,) = second.gateway.pool.settlements
    assert closed.session_id == session_of(reply) and closed.settled
    assert market.world.contracts.marketplace.get_session(closed.session_id).is_settled
    assert second.gateway.ledger.total == spent  # the spend survives the restart
