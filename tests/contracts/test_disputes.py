"""DisputeManager and VerifierRegistry revert paths, on both chains: what a hostile
challenger, juror, stranger or host tries, and that it gets nothing."""

from __future__ import annotations

from eth_account import Account
from eth_utils import keccak

from inferledger.chain.devchain import DevWorld
from inferledger.chain.receipts import sign_verdict
from inferledger.chain.units import usdc
from support import (
    VERIFIER_STAKE,
    host_signed,
    open_dispute,
    reverts,
    seated,
    settled_session,
    staked_verifiers,
    verdict,
)

COMMITMENT = b"\x07" * 32


def test_opening_refuses_what_the_host_did_not_sign_and_sessions_not_disputable(
    world: DevWorld,
) -> None:
    c = world.contracts
    disputes = c.disputes
    challenger = world.funded_sender("challenger", usdc("50"))
    c.token.approve(challenger, disputes.address, 2**256 - 1)
    balance = c.token.balance_of(challenger.address)
    session_id = settled_session(world)
    bundle_hash, signature = host_signed(world)
    forged = bytes(Account.unsafe_sign_hash(bundle_hash, challenger.account.key).signature)
    with reverts("DisputeManager: bundle not signed by the session's host"):
        disputes.open_dispute(challenger, session_id, 1, bundle_hash, forged, COMMITMENT)
    with reverts("DisputeManager: bundle not signed by the session's host"):  # another hash
        disputes.open_dispute(challenger, session_id, 1, keccak(b"other"), signature, COMMITMENT)
    with reverts("DisputeManager: checkpoints start at 1"):
        disputes.open_dispute(challenger, session_id, 0, bundle_hash, signature, COMMITMENT)
    with reverts("DisputeManager: session not settled"):
        disputes.open_dispute(challenger, 999, 1, bundle_hash, signature, COMMITMENT)
    assert c.token.balance_of(challenger.address) == balance  # no bond taken
    disputes.open_dispute(challenger, session_id, 1, bundle_hash, signature, COMMITMENT)
    with reverts("DisputeManager: a dispute is open on this session"):
        disputes.open_dispute(challenger, session_id, 1, bundle_hash, signature, COMMITMENT)
    late = settled_session(world)
    world.chain.time_travel(disputes.dispute_window() + 1)
    with reverts("DisputeManager: dispute window has passed"):
        disputes.open_dispute(challenger, late, 1, bundle_hash, signature, COMMITMENT)
    with reverts("DisputeManager: a dispute is open on this session"):
        disputes.release_exposure(challenger, session_id)


def test_only_a_seated_juror_votes_once_and_forged_verdicts_fail(world: DevWorld) -> None:
    c = world.contracts
    disputes = c.disputes
    jurors = staked_verifiers(world, 4)
    dispute_id = open_dispute(world, settled_session(world))
    # (The draw needs a block after the opening: each transaction here mines its own.)
    disputes.draw(world.owner, dispute_id)
    with reverts("DisputeManager: jury already drawn"):
        disputes.draw(world.owner, dispute_id)
    first, second, _ = seated(world, dispute_id, jurors)
    (outsider,) = [j for j in jurors if j.address not in disputes.get_dispute(dispute_id).seated]
    stranger = world.funded_sender("stranger")
    domain = disputes.domain()
    for signer in (outsider, stranger, world.host):
        forged = sign_verdict(signer.account.key, domain, dispute_id, True)
        with reverts("DisputeManager: signer is not a juror of this dispute"):
            disputes.submit_verdict(stranger, dispute_id, True, forged)
    # A juror's signature on one verdict does not carry over to the other, or to another id.
    honest = sign_verdict(first.account.key, domain, dispute_id, False)
    with reverts("DisputeManager: signer is not a juror of this dispute"):
        disputes.submit_verdict(stranger, dispute_id, True, honest)
    disputes.submit_verdict(stranger, dispute_id, False, honest)  # relayed by anyone
    with reverts("DisputeManager: juror already voted"):
        disputes.submit_verdict(stranger, dispute_id, False, honest)
    with reverts("DisputeManager: verdict period not over"):
        disputes.replace_silent(stranger, dispute_id)
    with reverts("DisputeManager: the jury is seated"):
        disputes.cancel(stranger, dispute_id)
    world.chain.time_travel(disputes.verdict_period() + 1)
    with reverts("DisputeManager: verdict period has passed"):
        verdict(world, dispute_id, second, False)
    info = disputes.get_dispute(dispute_id)
    assert (info.votes_honest, info.votes_fraud) == (1, 0)


def test_a_minority_juror_pays_and_a_resolved_dispute_takes_nothing_more(
    world: DevWorld,
) -> None:
    c = world.contracts
    disputes = c.disputes
    jurors = staked_verifiers(world, 3)
    dispute_id = open_dispute(world, settled_session(world))
    disputes.draw(world.owner, dispute_id)
    first, second, third = seated(world, dispute_id, jurors)
    verdict(world, dispute_id, first, True)
    verdict(world, dispute_id, second, False)
    verdict(world, dispute_id, third, False)  # no fraud, 2 to 1
    assert c.verifiers.get_verifier(first.address).stake == (
        VERIFIER_STAKE - disputes.minority_penalty()
    )
    assert disputes.credit(first.address) == 0
    assert disputes.credit(second.address) == disputes.verifier_fee()
    with reverts("DisputeManager: dispute not open"):
        verdict(world, dispute_id, first, True)
    with reverts("DisputeManager: dispute not open"):
        disputes.draw(world.owner, dispute_id)
    assert all(c.verifiers.get_verifier(j.address).assignments == 0 for j in jurors)


def test_too_few_verifiers_cancel_and_the_bond_comes_back(world: DevWorld) -> None:
    c = world.contracts
    disputes = c.disputes
    staked_verifiers(world, 1)
    dispute_id = open_dispute(world, settled_session(world))
    world.chain.mine()
    with reverts("DisputeManager: not enough verifiers"):
        disputes.draw(world.owner, dispute_id)
    with reverts("DisputeManager: the jury may still be drawn"):
        disputes.cancel(world.owner, dispute_id)
    with reverts("DisputeManager: jury not drawn"):
        disputes.replace_silent(world.owner, dispute_id)
    world.chain.time_travel(disputes.verdict_period() + 1)
    disputes.cancel(world.owner, dispute_id)
    challenger = disputes.get_dispute(dispute_id).challenger
    assert disputes.credit(challenger) == disputes.bond()
    with reverts("DisputeManager: nothing to withdraw"):
        disputes.withdraw(world.owner)


def test_registry_roles_are_the_disputes_contracts_and_a_seated_verifier_cannot_leave(
    world: DevWorld,
) -> None:
    c = world.contracts
    registry = c.verifiers
    fn = registry.contract.functions
    jurors = staked_verifiers(world, 3)
    for caller in (world.owner, jurors[0]):
        with reverts("VerifierRegistry: caller is not the disputes contract"):
            caller.transact(fn.penalize(jurors[1].address, 1, caller.address))
        with reverts("VerifierRegistry: caller is not the disputes contract"):
            caller.transact(fn.assign(jurors[1].address))
    with reverts("VerifierRegistry: disputes already set"):
        world.owner.transact(fn.set_disputes(world.owner.address))
    with reverts("VerifierRegistry: already registered"):
        registry.register(jurors[0], "http://again", usdc("20"))
    newcomer = world.funded_sender("newcomer", usdc("20"))
    c.token.approve(newcomer, registry.address, usdc("20"))
    with reverts("VerifierRegistry: stake below minimum"):
        registry.register(newcomer, "http://n", registry.min_stake() - 1)
    with reverts("VerifierRegistry: empty URL"):
        registry.register(newcomer, "", usdc("20"))
    dispute_id = open_dispute(world, settled_session(world))
    c.disputes.draw(world.owner, dispute_id)
    juror = jurors[0]
    registry.request_unstake(juror)
    world.chain.time_travel(c.deployment.params.unbonding_delay + 1)
    with reverts("VerifierRegistry: verifier holds a jury seat"):
        registry.withdraw_stake(juror)
    assert registry.get_verifier(juror.address).assignments == 1
