"""Host earnings, treasury fees, refunds and session status after settlements made
directly through the contract wrappers (no node)."""

from __future__ import annotations

import pytest
from eth_account import Account

from inferledger.chain.devchain import INPUT_PRICE, PRICE, PROOF, DevWorld, dev_account, sign
from inferledger.chain.units import settlement_split, usdc
from inferledger.sdk import Client, SdkError, Session
from inferledger.sdk.sessions import ShortSessionWarning

# The seed's figures: 200 output tokens (and no prompt tokens) at $0.002 on 2 USDC.
SEED = {"tokens": (0, 200), "host": 360_000, "fee": 40_000, "refund": 1_600_000}


def client_for(world: DevWorld, label: str, tmp_path) -> Client:
    return Client(
        world.chain,
        key="0x" + dev_account(label).key.hex(),
        deployment=world.contracts.deployment,
        sessions_dir=tmp_path,
    )


def settle_directly(world: DevWorld, session: Session, tokens: tuple[int, int]) -> str:
    """The host completes the session with the session signer's receipt for (input,
    output) ``tokens``; the tx hash."""
    signer = Account.from_key(session.record.signer_key.get_secret_value())
    signature = sign(world, signer, session.id, *tokens, PROOF)
    event = world.contracts.marketplace.complete_session(
        world.host, session.id, *tokens, PROOF, "test://bundle", signature
    )
    return event.tx_hash


def test_host_earnings_treasury_and_status_after_a_settlement(world: DevWorld, tmp_path) -> None:
    c = world.contracts
    user = client_for(world, "user", tmp_path)
    host = client_for(world, "host", tmp_path)
    treasury = client_for(world, "owner", tmp_path)  # the deployer is the treasury
    session = user.sessions.open(world.host.address, world.model_id, usdc("2"))
    session.detach()

    status = user.sessions.status(session.id)
    paid = (status.input_tokens_paid, status.output_tokens_paid)
    assert (status.state, status.can_finalize, paid) == ("open", False, (0, 0))
    prices = (status.input_price_per_mtok, status.output_price_per_mtok)
    assert prices == (INPUT_PRICE, PRICE)
    assert (status.host_amount, status.refund, status.settlement_tx) == (0, usdc("2"), None)

    tx_hash = settle_directly(world, session, SEED["tokens"])
    status = user.sessions.status(session.id)
    assert status.state == "settled" and status.settlement_tx == tx_hash
    paid = (status.input_tokens_paid, status.output_tokens_paid)
    assert (paid, status.host_amount, status.fee, status.refund) == (
        SEED["tokens"],
        SEED["host"],
        SEED["fee"],
        SEED["refund"],
    )
    assert status.refund_credited is False

    assert host.host.earnings() == SEED["host"]
    wallet = c.token.balance_of(host.address)
    withdrawal = host.host.withdraw()
    assert withdrawal.amount == SEED["host"] and withdrawal.tx_hash.startswith("0x")
    assert c.token.balance_of(host.address) == wallet + SEED["host"]
    assert host.host.earnings() == 0
    with pytest.raises(SdkError, match="no earnings"):
        host.host.withdraw()

    assert treasury.treasury.address == world.owner.address
    assert treasury.treasury.balance() == SEED["fee"]
    with pytest.raises(SdkError, match="only the treasury"):
        user.treasury.withdraw()
    wallet = c.token.balance_of(treasury.address)
    assert treasury.treasury.withdraw().amount == SEED["fee"]
    assert c.token.balance_of(treasury.address) == wallet + SEED["fee"]
    assert treasury.treasury.balance() == 0


def test_status_follows_close_requests_and_expiry_and_refunds_can_be_credited(
    world: DevWorld, tmp_path
) -> None:
    c, chain = world.contracts, world.chain
    user = client_for(world, "user", tmp_path)
    closing = user.sessions.open(world.host.address, world.model_id, usdc("2"))
    with pytest.warns(ShortSessionWarning, match="usable for 54s"):
        expiring = user.sessions.open(
            world.host.address, world.model_id, usdc("1"), max_duration=60
        )
    for session in (closing, expiring):
        session.detach()
    c.marketplace.request_close(user.sender, closing.id)
    status = user.sessions.status(closing.id)
    assert status.state == "closing" and not status.can_finalize
    assert status.finalize_after == status.close_requested_at + c.marketplace.close_window()

    chain.time_travel(c.marketplace.close_window() + 2)
    assert user.sessions.status(expiring.id).state == "expired"
    assert user.sessions.status(closing.id).can_finalize

    # A blocked depositor cannot receive its refund: it is credited instead.
    c.token.set_blocked(world.owner, user.address, True)
    settlement = closing.finalize()
    assert settlement.refund_credited and settlement.refund == usdc("2")
    assert user.sessions.status(closing.id).refund_credited is True
    assert user.sessions.refund_credit() == usdc("2")
    c.token.set_blocked(world.owner, user.address, False)
    before = c.token.balance_of(user.address)
    assert user.sessions.withdraw_refund().amount == usdc("2")
    assert c.token.balance_of(user.address) == before + usdc("2")
    with pytest.raises(SdkError, match="does not exist"):
        user.sessions.status(999_999)


def test_status_prices_prompt_and_completion_tokens(world: DevWorld, tmp_path) -> None:
    user = client_for(world, "user", tmp_path)
    session = user.sessions.open(world.host.address, world.model_id, usdc("2"))
    session.detach()
    tx_hash = settle_directly(world, session, (1_000, 300))
    status = user.sessions.status(session.id)
    expected = settlement_split(usdc("2"), 1_000, 300, INPUT_PRICE, PRICE, 1000)
    assert expected.gross == 500_000 + 600_000  # 1000 x $0.0005 + 300 x $0.002
    assert (status.settlement_tx, status.input_tokens_paid, status.output_tokens_paid) == (
        tx_hash,
        1_000,
        300,
    )
    assert (status.host_amount, status.fee, status.refund) == (
        expected.host,
        expected.fee,
        expected.refund,
    )


def test_open_refuses_maxima_below_the_host_prices(world: DevWorld, tmp_path) -> None:
    user = client_for(world, "user", tmp_path)
    for kind, maxima in [
        ("input", {"max_input_price_per_mtok": INPUT_PRICE - 1}),
        ("output", {"max_output_price_per_mtok": PRICE - 1}),
    ]:
        with pytest.raises(SdkError, match=f"per Mtok of {kind} tokens"):
            user.sessions.open(world.host.address, world.model_id, usdc("2"), **maxima)
    assert world.contracts.marketplace.sessions_of_user(user.address) == []
