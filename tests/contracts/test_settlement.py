"""The seed incident's acceptance story, on both chains."""

from __future__ import annotations

from inferledger.chain.devchain import DevWorld
from inferledger.chain.receipts import Receipt, receipt_digest
from inferledger.chain.units import settlement_split, usdc
from support import PROOF, URI, open_session, sign


def test_seed_example_pays_host_treasury_and_refund_exactly(world: DevWorld) -> None:
    c = world.contracts
    user_before = c.token.balance_of(world.user.address)
    session_id, signer = open_session(world)
    c.marketplace.submit_checkpoint(
        world.host, session_id, 200, PROOF, URI, sign(world, signer, session_id, 200)
    )
    settled = c.marketplace.complete_session(world.host, session_id, 200, PROOF, URI, b"")

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
        world.host, session_id, 150, PROOF, URI, sign(world, signer, session_id, 150)
    )
    split = settlement_split(usdc("2"), 150, 2_000_000_000, 1000)
    host_before = c.token.balance_of(world.host.address)
    c.earnings.withdraw(world.host, c.token.address)
    assert c.token.balance_of(world.host.address) - host_before == split.host
    treasury = c.deployment.treasury
    treasury_before = c.token.balance_of(treasury)
    c.marketplace.withdraw_treasury(world.owner)
    assert c.token.balance_of(treasury) - treasury_before == split.fee
    assert c.token.balance_of(c.marketplace.address) == 0


def test_receipt_digest_matches_contract(world: DevWorld) -> None:
    c = world.contracts
    receipt = Receipt(session_id=7, tokens=1234, proof_hash=PROOF)
    assert receipt_digest(c.marketplace.domain(), receipt) == c.marketplace.receipt_digest(
        7, 1234, PROOF
    )
