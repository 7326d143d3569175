"""Helpers shared by the contract tests: open sessions and sign receipts."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from web3.contract import Contract

from inferledger.chain.compile import CompiledContract, compile_all, compile_source
from inferledger.chain.connect import Chain
from inferledger.chain.contracts import NodeRegistry
from inferledger.chain.deploy import deploy_compiled
from inferledger.chain.devchain import (
    INPUT_PRICE,
    PRICE,
    PROOF,
    DevWorld,
    open_session,
    sign,
)
from inferledger.chain.errors import ContractRevert
from inferledger.chain.tx import TxSender

URI = "test://bundle"


# Extra deployments ---------------------------------------------------------------

# A token whose transfer/transferFrom return False (instead of reverting) once
# ``set_failing(True)`` is called: reaches the contracts' "transfer failed" asserts.
# No allowances: transferFrom moves anyone's balance. Tests only.
FAILING_TOKEN_SOURCE = """
# pragma version 0.4.3
# pragma evm-version cancun

balanceOf: public(HashMap[address, uint256])
failing: public(bool)


@external
def mint(receiver: address, amount: uint256):
    self.balanceOf[receiver] += amount


@external
def set_failing(on: bool):
    self.failing = on


@external
def transfer(receiver: address, amount: uint256) -> bool:
    if self.failing:
        return False
    self.balanceOf[msg.sender] -= amount
    self.balanceOf[receiver] += amount
    return True


@external
def transferFrom(sender: address, receiver: address, amount: uint256) -> bool:
    if self.failing:
        return False
    self.balanceOf[sender] -= amount
    self.balanceOf[receiver] += amount
    return True
"""


@functools.cache
def _failing_token() -> CompiledContract:
    return compile_source("FailingToken", FAILING_TOKEN_SOURCE)


def _deploy(world: DevWorld, sender: TxSender, compiled: CompiledContract, *args: Any) -> Contract:
    address = deploy_compiled(world.chain, sender, compiled, *args)
    return world.chain.w3.eth.contract(address=address, abi=compiled.abi)


def deploy_contract(
    world: DevWorld, name: str, *args: Any, sender: TxSender | None = None
) -> Contract:
    """A fresh instance of one of inferledger's contracts (default deployer: the owner)."""
    return _deploy(world, sender or world.owner, compile_all()[name], *args)


def deploy_failing_token(world: DevWorld) -> Contract:
    """A fresh FAILING_TOKEN_SOURCE token, deployed by the owner."""
    return _deploy(world, world.owner, _failing_token())


def next_tx_at(chain: Chain, timestamp: int) -> None:
    """Make the next transaction be both estimated and mined at block time ``timestamp``."""
    if chain.is_embedded:
        # The embedded chain estimates against the pending block and mines each block
        # one second after the previous one: bring the latest block to ``timestamp - 1``.
        target = timestamp - 1
        if chain.now() < target - 1:
            chain.time_travel(target - chain.now())
        while chain.now() < target:
            chain.mine()
        assert chain.now() == target, f"chain time {chain.now()} is already past {target}"
    else:
        # Mine one block at ``timestamp`` and pin the next (pending) one to the same time,
        # so estimate and inclusion both see it (anvil accepts equal timestamps).
        request = chain.w3.provider.make_request
        request("evm_setNextBlockTimestamp", [timestamp])
        request("evm_mine", [])
        request("evm_setNextBlockTimestamp", [timestamp])


@contextmanager
def reverts(reason: str) -> Iterator[None]:
    """Expect the block to raise ContractRevert with exactly ``reason``."""
    with pytest.raises(ContractRevert) as caught:
        yield
    assert caught.value.reason == reason


def registry_args(world: DevWorld, min_stake: int | None = None, delay: int = 0) -> tuple[Any, ...]:
    """NodeRegistry constructor arguments over the world's token and model registry."""
    c = world.contracts
    params = c.deployment.params
    stake = params.min_stake if min_stake is None else min_stake
    return (c.token.address, c.models.address, stake, delay, params.exposure_bps)


def slashable_registry(world: DevWorld) -> tuple[NodeRegistry, TxSender]:
    """A fresh NodeRegistry whose marketplace and dispute contract are one plain account
    (the "judge"), with the world's host registered at the minimum stake: slashing and the
    session counters can be driven directly. In a real deployment only the DisputeManager
    slashes, after a resolved dispute."""
    c = world.contracts
    delay = c.deployment.params.unbonding_delay
    contract = deploy_contract(world, "NodeRegistry", *registry_args(world, delay=delay))
    judge = world.funded_sender("judge")
    world.owner.transact(contract.functions.set_marketplace(judge.address))
    world.owner.transact(contract.functions.set_disputes(judge.address))
    nodes = NodeRegistry(world.chain, contract)
    stake = c.deployment.params.min_stake
    c.token.approve(world.host, nodes.address, stake)
    nodes.register(world.host, "ws://127.0.0.1:9", {world.model_id: (INPUT_PRICE, PRICE)}, stake)
    return nodes, judge


def slash(nodes: NodeRegistry, judge: TxSender, host: str, amount: int, recipient: str) -> Any:
    """Slash as the registry's dispute contract (``judge`` from :func:`slashable_registry`)."""
    return judge.transact(nodes.contract.functions.slash(host, amount, recipient))


def cover_exposure(world: DevWorld, deposits: int) -> None:
    """Stake enough more for the world's host to hold ``deposits`` more of open sessions
    (its exposure is capped at exposure_bps of its stake)."""
    c = world.contracts
    extra = deposits * 10_000 // c.deployment.params.exposure_bps + 1
    c.token.mint(world.owner, world.host.address, extra)
    c.token.approve(world.host, c.nodes.address, extra)
    c.nodes.add_stake(world.host, extra)


# Disputes ------------------------------------------------------------------------------

VERIFIER_STAKE = 20 * 10**6


def staked_verifiers(world: DevWorld, count: int = 3, prefix: str = "juror") -> list[TxSender]:
    """``count`` funded verifiers, registered with ``VERIFIER_STAKE`` each."""
    c = world.contracts
    jurors = []
    for i in range(count):
        juror = world.funded_sender(f"{prefix}-{i}", VERIFIER_STAKE)
        c.token.approve(juror, c.verifiers.address, VERIFIER_STAKE)
        c.verifiers.register(juror, f"http://127.0.0.1:{9000 + i}", VERIFIER_STAKE)
        jurors.append(juror)
    return jurors


def settled_session(world: DevWorld, tokens: tuple[int, int] = (20, 100)) -> int:
    """A session of the world's host completed at ``tokens`` (input, output); its id."""
    session_id, signer = open_session(world)
    signature = sign(world, signer, session_id, *tokens)
    world.contracts.marketplace.complete_session(
        world.host, session_id, *tokens, PROOF, URI, signature
    )
    return session_id


def host_signed(world: DevWorld, label: bytes = b"a bundle") -> tuple[bytes, bytes]:
    """(bundle hash, the world host's raw signature over it), as a node signs a bundle."""
    from eth_account import Account
    from eth_utils import keccak

    bundle_hash = keccak(label)
    signature = Account.unsafe_sign_hash(bundle_hash, world.host.account.key).signature
    return bundle_hash, bytes(signature)


def open_dispute(world: DevWorld, session_id: int, challenger: TxSender | None = None) -> int:
    """A dispute on checkpoint 1 of ``session_id`` by ``challenger`` (default: a new one)."""
    c = world.contracts
    challenger = challenger or world.funded_sender("challenger", 100 * 10**6)
    c.token.approve(challenger, c.disputes.address, c.disputes.bond())
    bundle_hash, signature = host_signed(world)
    commitment = b"\x07" * 32
    return c.disputes.open_dispute(challenger, session_id, 1, bundle_hash, signature, commitment)


def verdict(world: DevWorld, dispute_id: int, juror: TxSender, fraud: bool) -> Any:
    """``juror``'s signed verdict, relayed by the juror itself."""
    from inferledger.chain.receipts import sign_verdict

    c = world.contracts
    signature = sign_verdict(juror.account.key, c.disputes.domain(), dispute_id, fraud)
    return c.disputes.submit_verdict(juror, dispute_id, fraud, signature)


def seated(world: DevWorld, dispute_id: int, jurors: list[TxSender]) -> list[TxSender]:
    """The senders among ``jurors`` that sit on the dispute's jury, in seat order."""
    by_address = {j.address: j for j in jurors}
    return [by_address[a] for a in world.contracts.disputes.get_dispute(dispute_id).seated]


def machine_settings(max_examples: int, steps: int) -> settings:
    """Hypothesis settings for the contract state machines: slow chain steps, no example
    database (the chain is rebuilt per run), the failing history printed to replay."""
    return settings(
        max_examples=max_examples,
        stateful_step_count=steps,
        deadline=None,
        database=None,
        print_blob=True,
        report_multiple_bugs=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
