"""Hosts chosen and dropped: failover to the next host when the cheapest dies, and what
a hostile host gets (lying about usage, dying mid-stream): only what was receipted."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import openai
import pytest
from gateway_support import HELLO, MODEL, cost_of, register_host
from hostile_node import PROMPT_TOKENS, Behaviour, HostileNode
from node_support import wait_until

from inferledger.chain.devchain import INPUT_PRICE, PRICE, dev_account
from inferledger.chain.units import Prices, cost
from inferledger.sdk import Settlement

if TYPE_CHECKING:
    from gateway_support import Running
    from sdk_support import Market, NodeFactory

    from conftest import GatewayFactory

CHEAP = Prices(INPUT_PRICE, PRICE // 2)  # below the market host's price: chosen first


def settlement_of(run: Running, session_id: int) -> Settlement:
    """The gateway's close of ``session_id`` (it closes a failed host's session at once)."""
    wait_until(
        lambda: any(s.session_id == session_id for s in run.gateway.pool.settlements),
        f"the gateway to close session {session_id}",
    )
    return next(s for s in run.gateway.pool.settlements if s.session_id == session_id)


def finalized(market: Market, run: Running, settlement: Settlement) -> Settlement:
    """A session left closing on chain is finalized by the gateway once the close window
    has passed: R1 for the user."""
    if settlement.settled:
        return settlement
    market.world.chain.time_travel(market.world.contracts.marketplace.close_window() + 1)

    def final() -> Settlement | None:
        found = [
            s
            for s in run.gateway.pool.settlements
            if s.session_id == settlement.session_id and s.settled
        ]
        return found[0] if found else None

    wait_until(final, f"the gateway to finalize session {settlement.session_id}")
    result = final()
    assert result is not None
    return result


def test_when_the_cheapest_host_dies_between_requests_the_next_one_serves(
    market: Market, start_gateway: GatewayFactory, start_node: NodeFactory, scripted: object
) -> None:
    world = market.world
    cheap = register_host(world, "cheap-host", "ws://127.0.0.1:1/v1/ws", market.model_id, CHEAP)
    _node, cheap_server = start_node(scripted, host_key="0x" + dev_account("cheap-host").key.hex())
    world.contracts.nodes.update_url(cheap, cheap_server.url)
    run = start_gateway()
    client = run.openai()

    first = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6)
    assert first.usage is not None
    served_first = first.usage.model_extra["inferledger"]
    assert served_first["host"] == cheap.address
    cheap_server.stop()  # killed between requests

    second = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6)

    assert second.usage is not None and second.choices[0].message.content
    served_second = second.usage.model_extra["inferledger"]
    assert served_second["host"] == world.host.address
    assert served_second["session_id"] != served_first["session_id"]
    assert cheap.address.lower() in run.gateway.view()["avoided_hosts"]
    # The dead host's session is settled or finalizable, and the deposit comes back whole
    # but for what the host earned, never more than the receipted first reply.
    dead = finalized(market, run, settlement_of(run, served_first["session_id"]))
    info = world.contracts.marketplace.get_session(dead.session_id)
    assert dead.settled and dead.host_amount + dead.fee + dead.refund == info.deposit
    assert dead.host_amount + dead.fee <= cost_of(first.usage)


@pytest.fixture(params=["lie", "die"])
def hostile(request: pytest.FixtureRequest, market: Market) -> Iterator[HostileNode]:
    world = market.world
    host = register_host(world, "hostile", "ws://127.0.0.1:1/v1/ws", market.model_id, CHEAP)
    behaviour: Behaviour = request.param
    node = HostileNode(world.contracts.marketplace.domain(), host.account, CHEAP, behaviour)
    node.start()
    world.contracts.nodes.update_url(host, node.url)
    yield node
    node.stop()


def test_a_hostile_host_is_paid_only_what_was_receipted_and_is_dropped(
    market: Market, start_gateway: GatewayFactory, hostile: HostileNode
) -> None:
    run = start_gateway()
    client = run.openai()
    user = run.client.address
    assert user is not None
    if hostile.behaviour == "lie":
        # Nothing reached the client yet, so the next host answers the request.
        reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5)
        assert reply.usage is not None and reply.usage.completion_tokens == 5
        served = reply.usage.model_extra["inferledger"]
        assert served["host"] == market.world.host.address
        (tried,) = served["failed_attempts"]  # the liar first, for nothing
        assert (tried["host"], tried["cost"]) == (hostile.host.address, "0.000000")
        assert "RECEIPT_REFUSED" in tried["error"]
        receipted = 0  # the inflated receipt was refused: nothing signed
        spent_elsewhere = cost_of(reply.usage)
    else:
        stream = client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=20, stream=True
        )
        pieces: list[str] = []
        with pytest.raises(openai.APIError, match="failed mid-reply"):
            for chunk in stream:
                pieces.extend(c.delta.content or "" for c in chunk.choices)
        assert "".join(pieces) == " word" * 7  # all it sent arrived, then the error event
        receipted = 4
        spent_elsewhere = 0

    (hostile_session,) = [
        s
        for s in market.world.contracts.marketplace.sessions_of_user(user)
        if market.world.contracts.marketplace.get_session(s).host == hostile.host.address
    ]
    record = run.client.sessions.resume(hostile_session, auto_close=False).record
    assert record.signed_counts() == ((PROMPT_TOKENS, receipted) if receipted else (0, 0))
    assert len(hostile.receipts) == (1 if receipted else 0)
    # The gateway counts as spent only what was signed for, and avoids the host.
    signed = cost(PROMPT_TOKENS, receipted, *CHEAP) if receipted else 0
    assert run.gateway.ledger.total == signed + spent_elsewhere
    assert hostile.host.address.lower() in run.gateway.view()["avoided_hosts"]
    after = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert after.usage is not None
    assert after.usage.model_extra["inferledger"]["host"] == market.world.host.address
    # It never settled, so its session closes on chain and pays it nothing it did not
    # submit; the user gets the whole deposit back.
    closed = finalized(market, run, settlement_of(run, hostile_session))
    assert closed.settled and closed.host_amount == 0
    assert closed.refund == market.world.contracts.marketplace.get_session(hostile_session).deposit
