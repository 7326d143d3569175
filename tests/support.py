"""Helpers shared by the contract tests: open sessions and sign receipts."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from web3.contract import Contract

from inferledger.chain.compile import CompiledContract, compile_all, compile_source
from inferledger.chain.connect import Chain
from inferledger.chain.deploy import deploy_compiled
from inferledger.chain.devchain import (  # noqa: F401 (re-exported for the tests)
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
