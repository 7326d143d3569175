"""The seed incident's acceptance story, on both chains."""

from __future__ import annotations

from inferledger.chain import units
from inferledger.chain.devchain import DevWorld
from inferledger.chain.receipts import Receipt, receipt_digest
from inferledger.chain.units import settlement_split, usdc
from support import INPUT_PRICE, PRICE, PROOF, URI, open_session, sign


def test_seed_example_pays_host_treasury_and_refund_exactly(world: DevWorld) -> None:
    c = world.contracts
    user_before = c.token.balance_of(world.user.address)
    session_id, signer = open_session(world)
    # 200 completion tokens and no prompt tokens at $0.002 per output token.
    c.marketplace.submit_checkpoint(
        world.host, session_id, 0, 200, PROOF, URI, sign(world, signer, session_id, 0, 200)
    )
    settled = c.marketplace.complete_session(world.host, session_id, 0, 200, PROOF, URI, b"")

    assert (settled.host_amount, settled.fee, settled.refund) == (360_000, 40_000, 1_600_000)
    assert c.earnings.balance_of(world.host.address, c.token.address) == usdc("0.36")
    assert c.marketplace.treasury_balance() == usdc("0.04")
    assert c.token.balance_of(world.user.address) == user_before - usdc("0.40")
    assert c.marketplace.get_session(session_id).is_settled
    assert c.marketplace.open_deposits() == 0


def test_host_and_treasury_withdraw_their_shares(world: DevWorld) -> None:
    c = world.contracts
    session_id, signer = open_session(world)
    c.marketplace.complete_session(
        world.host, session_id, 90, 150, PROOF, URI, sign(world, signer, session_id, 90, 150)
    )
    split = settlement_split(usdc("2"), 90, 150, 500_000_000, 2_000_000_000, 1000)
    assert split.gross == 345_000  # 90 * $0.0005 + 150 * $0.002
    host_before = c.token.balance_of(world.host.address)
    c.earnings.withdraw(world.host, c.token.address)
    assert c.token.balance_of(world.host.address) - host_before == split.host
    treasury = c.deployment.treasury
    treasury_before = c.token.balance_of(treasury)
    c.marketplace.withdraw_treasury(world.owner)
    assert c.token.balance_of(treasury) - treasury_before == split.fee
    assert c.token.balance_of(c.marketplace.address) == 0


def test_input_and_output_tokens_are_both_billed_with_one_rounding(world: DevWorld) -> None:
    c = world.contracts
    user_before = c.token.balance_of(world.user.address)
    session_id, signer = open_session(world)
    # 1333 prompt tokens at $0.0005 (666_500 base units) plus 7 completion tokens at
    # $0.002 (14_000): each kind at its own price, and the deposit splits exactly.
    inputs, outputs = 1_333, 7
    settled = c.marketplace.complete_session(
        world.host,
        session_id,
        inputs,
        outputs,
        PROOF,
        URI,
        sign(world, signer, session_id, inputs, outputs),
    )
    gross = (inputs * INPUT_PRICE + outputs * PRICE) // 10**6
    assert gross == 680_500
    assert c.marketplace.contract.functions.cost(inputs, outputs, INPUT_PRICE, PRICE).call() == (
        gross
    )
    assert (settled.input_tokens, settled.output_tokens) == (inputs, outputs)
    assert settled.host_amount + settled.fee == gross
    assert settled.fee == gross * 1000 // 10_000
    assert settled.host_amount + settled.fee + settled.refund == usdc("2")
    assert c.token.balance_of(world.user.address) == user_before - gross


def test_cost_rounds_once_over_the_sum(world: DevWorld) -> None:
    cost = world.contracts.marketplace.contract.functions.cost
    # Each part alone is 0.6 base units (rounds to 0); together they are 1.2 -> 1.
    assert cost(1, 0, 600_000, 1).call() == 0
    assert cost(0, 1, 1, 600_000).call() == 0
    assert cost(1, 1, 600_000, 600_000).call() == 1
    # The Python mirror agrees, odd prices included.
    for args in [(1, 1, 600_000, 600_000), (1_333, 7, 333_333_337, 7_777_777), (0, 999, 1, 1001)]:
        assert cost(*args).call() == units.cost(*args)


def test_receipt_digest_matches_contract(world: DevWorld) -> None:
    c = world.contracts
    receipt = Receipt(session_id=7, input_tokens=4321, output_tokens=1234, proof_hash=PROOF)
    assert receipt_digest(c.marketplace.domain(), receipt) == c.marketplace.receipt_digest(
        7, 4321, 1234, PROOF
    )
