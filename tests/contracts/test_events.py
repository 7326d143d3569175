"""Every state-changing function logs what it changed, on both chains.

Each case calls one external function where it changes something and compares
the receipt's whole log, in order and with its arguments, against what it should
say. A meta-test reads the ABIs, so a function added without a case fails here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from eth_account import Account
from eth_utils import keccak
from web3.contract import Contract
from web3.types import TxReceipt

from inferledger.chain.compile import compile_all
from inferledger.chain.devchain import DevWorld, dev_account
from inferledger.chain.tx import TxSender
from inferledger.chain.units import settlement_split, usdc
from support import (
    INPUT_PRICE,
    PRICE,
    PROOF,
    URI,
    deploy_contract,
    host_signed,
    open_dispute,
    open_session,
    registry_args,
    seated,
    settled_session,
    sign,
    slashable_registry,
    staked_verifiers,
    verdict,
)

ZERO = "0x0000000000000000000000000000000000000000"
HASH = b"\x02" * 32
URL = "ws://10.0.0.2:9000"
SECOND_MODEL = "org/repo/second.gguf"
DEPOSIT = usdc("2")

# (contract, event, arguments): one decoded log.
Event = tuple[str, str, dict[str, Any]]
Case = Callable[[DevWorld], None]
CASES: list[tuple[str, str, Case]] = []


def case(contract: str, function: str) -> Callable[[Case], Case]:
    """Register the decorated function as a case for ``contract.function``."""

    def register(run: Case) -> Case:
        CASES.append((contract, function, run))
        return run

    return register


def ev(contract: str, event: str, **args: Any) -> Event:
    return (contract, event, args)


def logged(
    world: DevWorld, receipt: TxReceipt, extra: dict[str, Contract] | None = None
) -> list[Event]:
    """Every log of ``receipt``, decoded; each must come from a world contract or from
    one in ``extra`` (label -> contract)."""
    c = world.contracts
    sources = {
        "TestUSDC": c.token.contract,
        "ModelRegistry": c.models.contract,
        "NodeRegistry": c.nodes.contract,
        "HostEarnings": c.earnings.contract,
        "JobMarketplace": c.marketplace.contract,
        "VerifierRegistry": c.verifiers.contract,
        "DisputeManager": c.disputes.contract,
        **(extra or {}),
    }
    by_address = {contract.address: (label, contract) for label, contract in sources.items()}
    out = []
    for log in receipt["logs"]:
        label, contract = by_address[log["address"]]
        (event,) = [e for e in contract.events if e.topic == log["topics"][0].to_0x_hex()]
        args = event.process_log(log)["args"]
        out.append((label, event.event_name, {k: _plain(v) for k, v in args.items()}))
    return out


def _plain(value: Any) -> Any:
    return bytes(value) if isinstance(value, bytes) else value


def timestamp(world: DevWorld, receipt: TxReceipt) -> int:
    return int(world.chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"])


def min_stake(world: DevWorld) -> int:
    return world.contracts.deployment.params.min_stake


def second_model(world: DevWorld) -> bytes:
    return world.contracts.models.approve_model(world.owner, SECOND_MODEL, HASH)


def nodes_fn(world: DevWorld) -> Any:
    return world.contracts.nodes.contract.functions


def market_fn(world: DevWorld) -> Any:
    return world.contracts.marketplace.contract.functions


def settle(world: DevWorld, tokens: tuple[int, int] = (20, 100)) -> tuple[int, TxReceipt]:
    """Open a session and complete it at ``tokens`` (input, output); (id, receipt)."""
    session_id, signer = open_session(world, deposit=DEPOSIT)
    signature = sign(world, signer, session_id, *tokens)
    receipt = world.host.transact(
        market_fn(world).complete_session(session_id, *tokens, PROOF, URI, signature)
    )
    return session_id, receipt


def fake_marketplace(world: DevWorld, name: str, *args: Any) -> tuple[Contract, TxSender]:
    """A fresh ``name`` whose marketplace is a plain account, so its marketplace-only
    functions can be called directly."""
    contract = deploy_contract(world, name, *args)
    marketplace = world.funded_sender("fake marketplace")
    world.owner.transact(contract.functions.set_marketplace(marketplace.address))
    return contract, marketplace


# TestUSDC --------------------------------------------------------------------------


@case("TestUSDC", "transfer")
def transfer(world: DevWorld) -> None:
    receipt = world.contracts.token.transfer(world.user, world.owner.address, 5)
    assert logged(world, receipt) == [
        ev("TestUSDC", "Transfer", sender=world.user.address, receiver=world.owner.address, value=5)
    ]


@case("TestUSDC", "transferFrom")
def transfer_from(world: DevWorld) -> None:
    token = world.contracts.token
    token.approve(world.user, world.owner.address, 7)
    receipt = world.owner.transact(
        token.contract.functions.transferFrom(world.user.address, world.host.address, 5)
    )
    assert logged(world, receipt) == [
        ev("TestUSDC", "Transfer", sender=world.user.address, receiver=world.host.address, value=5)
    ]
    # Like USDC, the spent allowance is not logged again.
    assert token.allowance(world.user.address, world.owner.address) == 2


@case("TestUSDC", "approve")
def approve(world: DevWorld) -> None:
    receipt = world.contracts.token.approve(world.user, world.owner.address, 7)
    assert logged(world, receipt) == [
        ev("TestUSDC", "Approval", owner=world.user.address, spender=world.owner.address, value=7)
    ]


@case("TestUSDC", "mint")
def mint(world: DevWorld) -> None:
    receipt = world.contracts.token.mint(world.owner, world.user.address, 9)
    assert logged(world, receipt) == [
        ev("TestUSDC", "Transfer", sender=ZERO, receiver=world.user.address, value=9)
    ]


@case("TestUSDC", "set_blocked")
def set_blocked(world: DevWorld) -> None:
    receipt = world.contracts.token.set_blocked(world.owner, world.user.address, True)
    assert logged(world, receipt) == [
        ev("TestUSDC", "BlockedSet", account=world.user.address, blocked=True)
    ]


# ModelRegistry -----------------------------------------------------------------------


@case("ModelRegistry", "approve_model")
def approve_model(world: DevWorld) -> None:
    fn = world.contracts.models.contract.functions
    receipt = world.owner.transact(fn.approve_model(SECOND_MODEL, HASH))
    assert logged(world, receipt) == [
        ev(
            "ModelRegistry",
            "ModelApproved",
            model_id=keccak(text=SECOND_MODEL),
            name=SECOND_MODEL,
            weights_sha256=HASH,
        )
    ]


@case("ModelRegistry", "revoke_model")
def revoke_model(world: DevWorld) -> None:
    receipt = world.contracts.models.revoke_model(world.owner, world.model_id)
    assert logged(world, receipt) == [ev("ModelRegistry", "ModelRevoked", model_id=world.model_id)]


@case("ModelRegistry", "transfer_ownership")
def models_transfer_ownership(world: DevWorld) -> None:
    fn = world.contracts.models.contract.functions
    receipt = world.owner.transact(fn.transfer_ownership(world.host.address))
    assert logged(world, receipt) == [
        ev(
            "ModelRegistry",
            "OwnershipTransferred",
            previous_owner=world.owner.address,
            new_owner=world.host.address,
        )
    ]


# NodeRegistry ------------------------------------------------------------------------


@case("NodeRegistry", "register")
def register(world: DevWorld) -> None:
    c = world.contracts
    host = world.funded_sender("h2", usdc("100"))
    second = second_model(world)
    c.token.approve(host, c.nodes.address, min_stake(world))
    prices = {world.model_id: (INPUT_PRICE, PRICE), second: (0, 1)}
    receipt = c.nodes.register(host, URL, prices, min_stake(world))
    h = host.address
    assert logged(world, receipt) == [
        ev("NodeRegistry", "HostRegistered", host=h, api_url=URL, stake=min_stake(world)),
        ev("NodeRegistry", "HostActiveChanged", host=h, active=True),
        ev(
            "NodeRegistry",
            "ModelPriceSet",
            host=h,
            model_id=world.model_id,
            input_price_per_mtok=INPUT_PRICE,
            output_price_per_mtok=PRICE,
        ),
        ev(
            "NodeRegistry",
            "ModelPriceSet",
            host=h,
            model_id=second,
            input_price_per_mtok=0,
            output_price_per_mtok=1,
        ),
        ev("TestUSDC", "Transfer", sender=h, receiver=c.nodes.address, value=min_stake(world)),
    ]


@case("NodeRegistry", "update_url")
def update_url(world: DevWorld) -> None:
    receipt = world.contracts.nodes.update_url(world.host, URL)
    assert logged(world, receipt) == [
        ev("NodeRegistry", "HostUrlUpdated", host=world.host.address, api_url=URL)
    ]


def price_set(host: str, model_id: bytes, input_price: int, output_price: int) -> Event:
    return ev(
        "NodeRegistry",
        "ModelPriceSet",
        host=host,
        model_id=model_id,
        input_price_per_mtok=input_price,
        output_price_per_mtok=output_price,
    )


@case("NodeRegistry", "set_models")
def set_models(world: DevWorld) -> None:
    second = second_model(world)
    receipt = world.contracts.nodes.set_models(world.host, {second: (3, 7)})
    h = world.host.address
    cleared, listed = price_set(h, world.model_id, 0, 0), price_set(h, second, 3, 7)
    assert logged(world, receipt) == [cleared, listed]


def active_changed(host: str, active: bool) -> Event:
    return ev("NodeRegistry", "HostActiveChanged", host=host, active=active)


def stake_in(world: DevWorld, amount: int) -> Event:
    receiver = world.contracts.nodes.address
    return ev("TestUSDC", "Transfer", sender=world.host.address, receiver=receiver, value=amount)


def stake_out(world: DevWorld, receiver: str, amount: int) -> Event:
    sender = world.contracts.nodes.address
    return ev("TestUSDC", "Transfer", sender=sender, receiver=receiver, value=amount)


def add_stake(world: DevWorld, amount: int) -> TxReceipt:
    c = world.contracts
    c.token.approve(world.host, c.nodes.address, amount)
    return c.nodes.add_stake(world.host, amount)


def slashable(world: DevWorld) -> tuple[DevWorld, TxSender]:
    """The world with a fresh NodeRegistry whose dispute contract (and marketplace) is a
    plain account, the "judge", so slashes can be made directly; the host registered."""
    nodes, judge = slashable_registry(world)
    return replace(world, contracts=replace(world.contracts, nodes=nodes)), judge


def slash(world: DevWorld, judge: TxSender, amount: int) -> TxReceipt:
    fn = world.contracts.nodes.contract.functions
    return judge.transact(fn.slash(world.host.address, amount, world.user.address))


@case("NodeRegistry", "add_stake")
def add_stake_to_an_active_host(world: DevWorld) -> None:
    receipt = add_stake(world, 5)
    h = world.host.address
    assert logged(world, receipt) == [
        ev("NodeRegistry", "StakeAdded", host=h, amount=5, stake=min_stake(world) + 5),
        stake_in(world, 5),
    ]


@case("NodeRegistry", "add_stake")
def add_stake_reactivates_a_slashed_host(world: DevWorld) -> None:
    world, judge = slashable(world)
    slash(world, judge, 1)
    receipt = add_stake(world, 1)
    h = world.host.address
    assert logged(world, receipt) == [
        ev("NodeRegistry", "StakeAdded", host=h, amount=1, stake=min_stake(world)),
        active_changed(h, True),
        stake_in(world, 1),
    ]


@case("NodeRegistry", "add_stake")
def add_stake_while_unbonding(world: DevWorld) -> None:
    world, judge = slashable(world)
    world.contracts.nodes.request_unstake(world.host)
    slash(world, judge, 1)
    receipt = add_stake(world, 1)
    h = world.host.address
    assert logged(world, receipt) == [  # an unbonding host stays inactive
        ev("NodeRegistry", "StakeAdded", host=h, amount=1, stake=min_stake(world)),
        stake_in(world, 1),
    ]


@case("NodeRegistry", "request_unstake")
def request_unstake(world: DevWorld) -> None:
    receipt = world.contracts.nodes.request_unstake(world.host)
    h = world.host.address
    ends_at = timestamp(world, receipt) + world.contracts.deployment.params.unbonding_delay
    assert logged(world, receipt) == [
        ev("NodeRegistry", "UnbondingStarted", host=h, unbonding_ends_at=ends_at),
        active_changed(h, False),
    ]


@case("NodeRegistry", "request_unstake")
def request_unstake_when_slashed_inactive(world: DevWorld) -> None:
    world, judge = slashable(world)
    slash(world, judge, 1)
    receipt = world.contracts.nodes.request_unstake(world.host)
    h = world.host.address
    ends_at = timestamp(world, receipt) + world.contracts.deployment.params.unbonding_delay
    assert logged(world, receipt) == [
        ev("NodeRegistry", "UnbondingStarted", host=h, unbonding_ends_at=ends_at)
    ]


@case("NodeRegistry", "cancel_unstake")
def cancel_unstake(world: DevWorld) -> None:
    nodes = world.contracts.nodes
    nodes.request_unstake(world.host)
    receipt = nodes.cancel_unstake(world.host)
    h = world.host.address
    assert logged(world, receipt) == [
        ev("NodeRegistry", "UnbondingCancelled", host=h),
        active_changed(h, True),
    ]


@case("NodeRegistry", "withdraw_stake")
def withdraw_stake(world: DevWorld) -> None:
    nodes = world.contracts.nodes
    second = second_model(world)
    nodes.set_models(world.host, {world.model_id: (INPUT_PRICE, PRICE), second: (0, 1)})
    # The host went inactive when it started unbonding, and said so then.
    unstaked = nodes.request_unstake(world.host)
    h = world.host.address
    assert active_changed(h, False) in logged(world, unstaked)
    world.chain.time_travel(world.contracts.deployment.params.unbonding_delay + 1)
    receipt = nodes.withdraw_stake(world.host)
    assert logged(world, receipt) == [
        price_set(h, world.model_id, 0, 0),
        price_set(h, second, 0, 0),
        ev("NodeRegistry", "HostDeregistered", host=h),
        ev("NodeRegistry", "StakeWithdrawn", host=h, amount=min_stake(world)),
        stake_out(world, h, min_stake(world)),
    ]


@case("NodeRegistry", "slash")
def slash_leaving_the_minimum(world: DevWorld) -> None:
    world, judge = slashable(world)
    add_stake(world, 3)
    receipt = slash(world, judge, 3)
    h = world.host.address
    assert logged(world, receipt) == [
        ev(
            "NodeRegistry",
            "HostSlashed",
            host=h,
            amount=3,
            recipient=world.user.address,
            stake=min_stake(world),
        ),
        stake_out(world, world.user.address, 3),
    ]


@case("NodeRegistry", "slash")
def slash_below_the_minimum(world: DevWorld) -> None:
    world, judge = slashable(world)
    receipt = slash(world, judge, 1)
    h = world.host.address
    assert logged(world, receipt) == [
        ev(
            "NodeRegistry",
            "HostSlashed",
            host=h,
            amount=1,
            recipient=world.user.address,
            stake=min_stake(world) - 1,
        ),
        active_changed(h, False),
        stake_out(world, world.user.address, 1),
    ]


@case("NodeRegistry", "session_opened")
def session_opened(world: DevWorld) -> None:
    world, judge = slashable(world)
    receipt = judge.transact(nodes_fn(world).session_opened(world.host.address, 7))
    h = world.host.address
    assert logged(world, receipt) == [
        ev("NodeRegistry", "SessionCountChanged", host=h, open_sessions=1),
        ev("NodeRegistry", "ExposureChanged", host=h, exposure=7),
    ]


@case("NodeRegistry", "session_closed")
def session_closed(world: DevWorld) -> None:
    world, judge = slashable(world)
    h = world.host.address
    judge.transact(nodes_fn(world).session_opened(h, 7))
    receipt = judge.transact(nodes_fn(world).session_closed(h, 7, 3))
    assert logged(world, receipt) == [  # the paid 3 stay exposed until released
        ev("NodeRegistry", "SessionCountChanged", host=h, open_sessions=0),
        ev("NodeRegistry", "ExposureChanged", host=h, exposure=3),
    ]


@case("NodeRegistry", "release_exposure")
def nodes_release_exposure(world: DevWorld) -> None:
    world, judge = slashable(world)
    h = world.host.address
    judge.transact(nodes_fn(world).session_opened(h, 7))
    receipt = judge.transact(nodes_fn(world).release_exposure(h, 7))
    assert logged(world, receipt) == [ev("NodeRegistry", "ExposureChanged", host=h, exposure=0)]


@case("NodeRegistry", "set_marketplace")
def nodes_set_marketplace(world: DevWorld) -> None:
    nodes = deploy_contract(world, "NodeRegistry", *registry_args(world))
    receipt = world.owner.transact(nodes.functions.set_marketplace(world.user.address))
    assert logged(world, receipt, {"fresh": nodes}) == [
        ev("fresh", "MarketplaceSet", marketplace=world.user.address)
    ]


@case("NodeRegistry", "set_disputes")
def nodes_set_disputes(world: DevWorld) -> None:
    nodes = deploy_contract(world, "NodeRegistry", *registry_args(world))
    receipt = world.owner.transact(nodes.functions.set_disputes(world.user.address))
    assert logged(world, receipt, {"fresh": nodes}) == [
        ev("fresh", "DisputesSet", disputes=world.user.address)
    ]


@case("NodeRegistry", "accept_ownership")
def nodes_accept_ownership(world: DevWorld) -> None:
    world.owner.transact(nodes_fn(world).transfer_ownership(world.user.address))
    receipt = world.user.transact(nodes_fn(world).accept_ownership())
    assert logged(world, receipt) == [
        ev(
            "NodeRegistry",
            "OwnershipTransferred",
            previous_owner=world.owner.address,
            new_owner=world.user.address,
        )
    ]


@case("NodeRegistry", "transfer_ownership")
def nodes_transfer_ownership(world: DevWorld) -> None:
    receipt = world.owner.transact(nodes_fn(world).transfer_ownership(world.user.address))
    assert logged(world, receipt) == [
        ev(
            "NodeRegistry",
            "OwnershipTransferStarted",
            previous_owner=world.owner.address,
            new_owner=world.user.address,
        )
    ]


# HostEarnings ------------------------------------------------------------------------


def credited(world: DevWorld, amounts: dict[Contract, int]) -> Contract:
    """A fresh HostEarnings holding, for each token, that amount credited to the host."""
    earnings, marketplace = fake_marketplace(world, "HostEarnings")
    for token, amount in amounts.items():
        marketplace.transact(token.functions.mint(earnings.address, amount))
        marketplace.transact(earnings.functions.credit(world.host.address, token.address, amount))
    return earnings


@case("HostEarnings", "set_marketplace")
def earnings_set_marketplace(world: DevWorld) -> None:
    earnings = deploy_contract(world, "HostEarnings")
    receipt = world.owner.transact(earnings.functions.set_marketplace(world.user.address))
    assert logged(world, receipt, {"fresh": earnings}) == [
        ev("fresh", "MarketplaceSet", marketplace=world.user.address)
    ]


@case("HostEarnings", "credit")
def credit(world: DevWorld) -> None:
    earnings, marketplace = fake_marketplace(world, "HostEarnings")
    token, host = world.contracts.token.address, world.host.address
    marketplace.transact(earnings.functions.credit(host, token, 5))
    receipt = marketplace.transact(earnings.functions.credit(host, token, 7))
    assert logged(world, receipt, {"fresh": earnings}) == [
        ev("fresh", "EarningsCredited", host=host, token=token, amount=7, balance=12)
    ]


@case("HostEarnings", "withdraw")
def withdraw(world: DevWorld) -> None:
    token = world.contracts.token.contract
    earnings = credited(world, {token: 5})
    receipt = world.host.transact(earnings.functions.withdraw(token.address))
    h = world.host.address
    assert logged(world, receipt, {"fresh": earnings}) == [
        ev("fresh", "EarningsWithdrawn", host=h, token=token.address, amount=5),
        ev("TestUSDC", "Transfer", sender=earnings.address, receiver=h, value=5),
    ]


@case("HostEarnings", "withdraw_many")
def withdraw_many(world: DevWorld) -> None:
    token = world.contracts.token.contract
    other = deploy_contract(world, "TestUSDC")
    earnings = credited(world, {token: 5, other: 3})
    receipt = world.host.transact(earnings.functions.withdraw_many([token.address, other.address]))
    h, e = world.host.address, earnings.address
    assert logged(world, receipt, {"fresh": earnings, "other": other}) == [
        ev("fresh", "EarningsWithdrawn", host=h, token=token.address, amount=5),
        ev("TestUSDC", "Transfer", sender=e, receiver=h, value=5),
        ev("fresh", "EarningsWithdrawn", host=h, token=other.address, amount=3),
        ev("other", "Transfer", sender=e, receiver=h, value=3),
    ]


# JobMarketplace ----------------------------------------------------------------------


@case("JobMarketplace", "create_session")
def create_session(world: DevWorld) -> None:
    c = world.contracts
    signer = Account.create().address
    c.token.approve(world.user, c.marketplace.address, DEPOSIT)
    session_id = market_fn(world).session_count().call() + 1
    receipt = world.user.transact(
        market_fn(world).create_session(
            world.host.address, world.model_id, DEPOSIT, INPUT_PRICE, PRICE, 86400, 100, signer
        )
    )
    h, u = world.host.address, world.user.address
    assert logged(world, receipt) == [
        ev(
            "JobMarketplace",
            "SessionCreated",
            session_id=session_id,
            depositor=u,
            host=h,
            model_id=world.model_id,
            signer=signer,
            deposit=DEPOSIT,
            input_price_per_mtok=INPUT_PRICE,
            output_price_per_mtok=PRICE,
            fee_bps=c.deployment.params.fee_bps,
            proof_interval=100,
            expires_at=timestamp(world, receipt) + 86400,
        ),
        ev("NodeRegistry", "SessionCountChanged", host=h, open_sessions=1),
        ev("NodeRegistry", "ExposureChanged", host=h, exposure=DEPOSIT),
        ev("TestUSDC", "Transfer", sender=u, receiver=c.marketplace.address, value=DEPOSIT),
    ]


def checkpointed(session_id: int, index: int, tokens: tuple[int, int]) -> Event:
    return ev(
        "JobMarketplace",
        "CheckpointSubmitted",
        session_id=session_id,
        index=index,
        input_tokens=tokens[0],
        output_tokens=tokens[1],
        proof_hash=PROOF,
        proof_uri=URI,
    )


def settled_logs(
    world: DevWorld, session_id: int, tokens: tuple[int, int], settled_by: str, *, pushed: bool
) -> list[Event]:
    """What settling ``session_id`` at ``tokens`` logs; ``pushed``: the refund is sent,
    not credited."""
    c = world.contracts
    market, earnings = c.marketplace.address, c.earnings.address
    h, u = world.host.address, world.user.address
    split = settlement_split(
        DEPOSIT, *tokens, INPUT_PRICE, PRICE, world.contracts.deployment.params.fee_bps
    )
    logs = [
        ev(
            "JobMarketplace",
            "SessionSettled",
            session_id=session_id,
            host=h,
            settled_by=settled_by,
            input_tokens=tokens[0],
            output_tokens=tokens[1],
            host_amount=split.host,
            fee=split.fee,
            refund=split.refund,
        ),
        ev("NodeRegistry", "SessionCountChanged", host=h, open_sessions=0),
        # What it paid stays exposed to disputes until its window is released.
        ev("NodeRegistry", "ExposureChanged", host=h, exposure=split.gross),
    ]
    if split.host:
        logs += [
            ev("TestUSDC", "Transfer", sender=market, receiver=earnings, value=split.host),
            ev(
                "HostEarnings",
                "EarningsCredited",
                host=h,
                token=c.token.address,
                amount=split.host,
                balance=split.host,
            ),
        ]
    if pushed:
        logs.append(ev("TestUSDC", "Transfer", sender=market, receiver=u, value=split.refund))
    else:
        logs.append(
            ev(
                "JobMarketplace",
                "RefundCredited",
                depositor=u,
                session_id=session_id,
                amount=split.refund,
            )
        )
    return logs


@case("JobMarketplace", "submit_checkpoint")
def submit_checkpoint(world: DevWorld) -> None:
    session_id, signer = open_session(world, deposit=DEPOSIT)
    signature = sign(world, signer, session_id, 20, 100)
    receipt = world.host.transact(
        market_fn(world).submit_checkpoint(session_id, 20, 100, PROOF, URI, signature)
    )
    assert logged(world, receipt) == [checkpointed(session_id, 1, (20, 100))]


@case("JobMarketplace", "complete_session")
def complete_session(world: DevWorld) -> None:
    session_id, receipt = settle(world, (20, 100))
    assert logged(world, receipt) == [
        checkpointed(session_id, 1, (20, 100)),
        *settled_logs(world, session_id, (20, 100), world.host.address, pushed=True),
    ]


@case("JobMarketplace", "request_close")
def request_close(world: DevWorld) -> None:
    session_id, _ = open_session(world, deposit=DEPOSIT)
    receipt = world.user.transact(market_fn(world).request_close(session_id))
    deadline = timestamp(world, receipt) + world.contracts.deployment.params.close_window
    assert logged(world, receipt) == [
        ev(
            "JobMarketplace",
            "CloseRequested",
            session_id=session_id,
            depositor=world.user.address,
            deadline=deadline,
        )
    ]


@case("JobMarketplace", "finalize")
def finalize(world: DevWorld) -> None:
    session_id, signer = open_session(world, deposit=DEPOSIT)
    signature = sign(world, signer, session_id, 10, 50)
    world.host.transact(
        market_fn(world).submit_checkpoint(session_id, 10, 50, PROOF, URI, signature)
    )
    world.user.transact(market_fn(world).request_close(session_id))
    world.chain.time_travel(world.contracts.deployment.params.close_window + 1)
    receipt = world.owner.transact(market_fn(world).finalize(session_id))
    assert logged(world, receipt) == settled_logs(
        world, session_id, (10, 50), world.owner.address, pushed=True
    )


@case("JobMarketplace", "withdraw_refund")
def withdraw_refund(world: DevWorld) -> None:
    c = world.contracts
    session_id, signer = open_session(world, deposit=DEPOSIT)
    c.token.set_blocked(world.owner, world.user.address, True)
    signature = sign(world, signer, session_id, 20, 100)
    settled = world.host.transact(
        market_fn(world).complete_session(session_id, 20, 100, PROOF, URI, signature)
    )
    assert logged(world, settled) == [
        checkpointed(session_id, 1, (20, 100)),
        *settled_logs(world, session_id, (20, 100), world.host.address, pushed=False),
    ]
    c.token.set_blocked(world.owner, world.user.address, False)
    refund = c.marketplace.refund_credit(world.user.address)
    receipt = world.user.transact(market_fn(world).withdraw_refund())
    u = world.user.address
    assert logged(world, receipt) == [
        ev("JobMarketplace", "RefundWithdrawn", depositor=u, amount=refund),
        ev("TestUSDC", "Transfer", sender=c.marketplace.address, receiver=u, value=refund),
    ]


@case("JobMarketplace", "withdraw_treasury")
def withdraw_treasury(world: DevWorld) -> None:
    c = world.contracts
    settle(world)
    fee = c.marketplace.treasury_balance()
    receipt = world.owner.transact(market_fn(world).withdraw_treasury())
    o = world.owner.address
    assert logged(world, receipt) == [
        ev("JobMarketplace", "TreasuryWithdrawn", treasury=o, amount=fee),
        ev("TestUSDC", "Transfer", sender=c.marketplace.address, receiver=o, value=fee),
    ]


@case("JobMarketplace", "set_fee_bps")
def set_fee_bps(world: DevWorld) -> None:
    receipt = world.owner.transact(market_fn(world).set_fee_bps(500))
    assert logged(world, receipt) == [ev("JobMarketplace", "FeeUpdated", fee_bps=500)]


@case("JobMarketplace", "set_treasury")
def set_treasury(world: DevWorld) -> None:
    receipt = world.owner.transact(market_fn(world).set_treasury(world.user.address))
    assert logged(world, receipt) == [
        ev("JobMarketplace", "TreasuryUpdated", treasury=world.user.address)
    ]


@case("JobMarketplace", "transfer_ownership")
def market_transfer_ownership(world: DevWorld) -> None:
    receipt = world.owner.transact(market_fn(world).transfer_ownership(world.user.address))
    assert logged(world, receipt) == [
        ev(
            "JobMarketplace",
            "OwnershipTransferred",
            previous_owner=world.owner.address,
            new_owner=world.user.address,
        )
    ]


# VerifierRegistry ----------------------------------------------------------------------

V_STAKE = usdc("20")


def verifier_fn(world: DevWorld) -> Any:
    return world.contracts.verifiers.contract.functions


def v_transfer(world: DevWorld, sender: str, receiver: str, value: int) -> Event:
    return ev("TestUSDC", "Transfer", sender=sender, receiver=receiver, value=value)


def v_active(verifier: str, active: bool) -> Event:
    return ev("VerifierRegistry", "VerifierActiveChanged", verifier=verifier, active=active)


@case("VerifierRegistry", "register")
def verifier_register(world: DevWorld) -> None:
    c = world.contracts
    v = world.funded_sender("verifier", V_STAKE)
    c.token.approve(v, c.verifiers.address, V_STAKE)
    receipt = c.verifiers.register(v, URL, V_STAKE)
    assert logged(world, receipt) == [
        ev("VerifierRegistry", "VerifierRegistered", verifier=v.address, url=URL, stake=V_STAKE),
        v_active(v.address, True),
        v_transfer(world, v.address, c.verifiers.address, V_STAKE),
    ]


@case("VerifierRegistry", "update_url")
def verifier_update_url(world: DevWorld) -> None:
    (v,) = staked_verifiers(world, 1)
    receipt = world.contracts.verifiers.update_url(v, "http://elsewhere")
    assert logged(world, receipt) == [
        ev("VerifierRegistry", "VerifierUrlUpdated", verifier=v.address, url="http://elsewhere")
    ]


@case("VerifierRegistry", "add_stake")
def verifier_add_stake(world: DevWorld) -> None:
    c = world.contracts
    (v,) = staked_verifiers(world, 1)
    c.token.mint(v, v.address, 5)
    c.token.approve(v, c.verifiers.address, 5)
    receipt = c.verifiers.add_stake(v, 5)
    assert logged(world, receipt) == [
        ev(
            "VerifierRegistry",
            "VerifierStakeAdded",
            verifier=v.address,
            amount=5,
            stake=V_STAKE + 5,
        ),
        v_transfer(world, v.address, c.verifiers.address, 5),
    ]


@case("VerifierRegistry", "request_unstake")
def verifier_request_unstake(world: DevWorld) -> None:
    (v,) = staked_verifiers(world, 1)
    receipt = world.contracts.verifiers.request_unstake(v)
    ends = timestamp(world, receipt) + world.contracts.deployment.params.unbonding_delay
    assert logged(world, receipt) == [
        ev(
            "VerifierRegistry",
            "VerifierUnbondingStarted",
            verifier=v.address,
            unbonding_ends_at=ends,
        ),
        v_active(v.address, False),
    ]


@case("VerifierRegistry", "cancel_unstake")
def verifier_cancel_unstake(world: DevWorld) -> None:
    (v,) = staked_verifiers(world, 1)
    world.contracts.verifiers.request_unstake(v)
    receipt = world.contracts.verifiers.cancel_unstake(v)
    assert logged(world, receipt) == [
        ev("VerifierRegistry", "VerifierUnbondingCancelled", verifier=v.address),
        v_active(v.address, True),
    ]


@case("VerifierRegistry", "withdraw_stake")
def verifier_withdraw_stake(world: DevWorld) -> None:
    c = world.contracts
    (v,) = staked_verifiers(world, 1)
    c.verifiers.request_unstake(v)
    world.chain.time_travel(c.deployment.params.unbonding_delay + 1)
    receipt = c.verifiers.withdraw_stake(v)
    assert logged(world, receipt) == [
        ev("VerifierRegistry", "VerifierStakeWithdrawn", verifier=v.address, amount=V_STAKE),
        v_transfer(world, c.verifiers.address, v.address, V_STAKE),
    ]


def fake_disputes(world: DevWorld) -> tuple[Contract, TxSender, TxSender]:
    """A fresh VerifierRegistry whose dispute contract is a plain account, with one
    verifier staked: (registry, the account, the verifier)."""
    c = world.contracts
    registry = deploy_contract(world, "VerifierRegistry", c.token.address, V_STAKE, 0)
    judge = world.funded_sender("fake disputes")
    world.owner.transact(registry.functions.set_disputes(judge.address))
    v = world.funded_sender("verifier", V_STAKE)
    c.token.approve(v, registry.address, V_STAKE)
    v.transact(registry.functions.register(URL, V_STAKE))
    return registry, judge, v


@case("VerifierRegistry", "penalize")
def verifier_penalize(world: DevWorld) -> None:
    registry, judge, v = fake_disputes(world)
    receipt = judge.transact(registry.functions.penalize(v.address, 3, judge.address))
    assert logged(world, receipt, {"fresh": registry}) == [
        ev(
            "fresh",
            "VerifierPenalized",
            verifier=v.address,
            amount=3,
            recipient=judge.address,
            stake=V_STAKE - 3,
        ),
        ev("fresh", "VerifierActiveChanged", verifier=v.address, active=False),
        v_transfer(world, registry.address, judge.address, 3),
    ]


@case("VerifierRegistry", "assign")
def verifier_assign(world: DevWorld) -> None:
    registry, judge, v = fake_disputes(world)
    receipt = judge.transact(registry.functions.assign(v.address))
    assert logged(world, receipt, {"fresh": registry}) == [
        ev("fresh", "AssignmentsChanged", verifier=v.address, assignments=1)
    ]


@case("VerifierRegistry", "release")
def verifier_release(world: DevWorld) -> None:
    registry, judge, v = fake_disputes(world)
    judge.transact(registry.functions.assign(v.address))
    receipt = judge.transact(registry.functions.release(v.address))
    assert logged(world, receipt, {"fresh": registry}) == [
        ev("fresh", "AssignmentsChanged", verifier=v.address, assignments=0)
    ]


@case("VerifierRegistry", "set_disputes")
def verifier_set_disputes(world: DevWorld) -> None:
    c = world.contracts
    registry = deploy_contract(world, "VerifierRegistry", c.token.address, V_STAKE, 0)
    receipt = world.owner.transact(registry.functions.set_disputes(world.user.address))
    assert logged(world, receipt, {"fresh": registry}) == [
        ev("fresh", "DisputesSet", disputes=world.user.address)
    ]


# DisputeManager ------------------------------------------------------------------------


def bond_of(world: DevWorld) -> int:
    return world.contracts.disputes.bond()


@case("DisputeManager", "open_dispute")
def dispute_open(world: DevWorld) -> None:
    c = world.contracts
    session_id = settled_session(world)
    challenger = world.funded_sender("challenger", usdc("10"))
    c.token.approve(challenger, c.disputes.address, bond_of(world))
    bundle_hash, signature = host_signed(world)
    receipt = challenger.transact(
        c.disputes.contract.functions.open_dispute(session_id, 1, bundle_hash, signature, HASH)
    )
    assert logged(world, receipt) == [
        ev(
            "DisputeManager",
            "DisputeOpened",
            dispute_id=1,
            session_id=session_id,
            checkpoint_index=1,
            challenger=challenger.address,
            bundle_hash=bundle_hash,
            transcript_commitment=HASH,
            bond=bond_of(world),
        ),
        v_transfer(world, challenger.address, c.disputes.address, bond_of(world)),
    ]


@case("DisputeManager", "draw")
def dispute_draw(world: DevWorld) -> None:
    c = world.contracts
    staked_verifiers(world, 3)
    dispute_id = open_dispute(world, settled_session(world))
    receipt = c.disputes.draw(world.owner, dispute_id)
    jurors = c.disputes.get_dispute(dispute_id).seated
    deadline = timestamp(world, receipt) + c.disputes.verdict_period()
    assert logged(world, receipt) == [
        *[
            ev(
                "DisputeManager",
                "JurorDrawn",
                dispute_id=dispute_id,
                seat=i,
                verifier=j,
                verdict_deadline=deadline,
            )
            for i, j in enumerate(jurors)
        ],
        *[ev("VerifierRegistry", "AssignmentsChanged", verifier=j, assignments=1) for j in jurors],
    ]


@case("DisputeManager", "submit_verdict")
def dispute_verdicts(world: DevWorld) -> None:
    c = world.contracts
    jurors = staked_verifiers(world, 3)
    session_id = settled_session(world)
    dispute_id = open_dispute(world, session_id)
    c.disputes.draw(world.owner, dispute_id)
    first, second, third = seated(world, dispute_id, jurors)
    receipt = verdict(world, dispute_id, first, False)
    assert logged(world, receipt) == [
        ev(
            "DisputeManager",
            "VerdictSubmitted",
            dispute_id=dispute_id,
            verifier=first.address,
            fraud=False,
        )
    ]
    verdict(world, dispute_id, second, True)  # the minority, in the end
    receipt = verdict(world, dispute_id, third, False)
    fee = c.disputes.verifier_fee()
    penalty = c.disputes.minority_penalty()
    host_share = bond_of(world) + penalty - 2 * fee
    assert logged(world, receipt) == [
        ev(
            "DisputeManager",
            "VerdictSubmitted",
            dispute_id=dispute_id,
            verifier=third.address,
            fraud=False,
        ),
        ev("VerifierRegistry", "AssignmentsChanged", verifier=first.address, assignments=0),
        ev("VerifierRegistry", "AssignmentsChanged", verifier=second.address, assignments=0),
        ev(
            "VerifierRegistry",
            "VerifierPenalized",
            verifier=second.address,
            amount=penalty,
            recipient=c.disputes.address,
            stake=V_STAKE - penalty,
        ),
        v_transfer(world, c.verifiers.address, c.disputes.address, penalty),
        ev(
            "DisputeManager",
            "JurorPenalized",
            dispute_id=dispute_id,
            verifier=second.address,
            penalty=penalty,
        ),
        ev("VerifierRegistry", "AssignmentsChanged", verifier=third.address, assignments=0),
        ev("DisputeManager", "Credited", account=first.address, dispute_id=dispute_id, amount=fee),
        ev("DisputeManager", "Credited", account=third.address, dispute_id=dispute_id, amount=fee),
        ev(
            "DisputeManager",
            "Credited",
            account=world.host.address,
            dispute_id=dispute_id,
            amount=host_share,
        ),
        ev(
            "DisputeManager",
            "DisputeResolved",
            dispute_id=dispute_id,
            session_id=session_id,
            fraud=False,
            slashed=0,
            depositor_amount=0,
            challenger_amount=0,
            host_amount=host_share,
            verifier_fees=2 * fee,
        ),
    ]


@case("DisputeManager", "replace_silent")
def dispute_replace_silent(world: DevWorld) -> None:
    c = world.contracts
    jurors = staked_verifiers(world, 3)
    dispute_id = open_dispute(world, settled_session(world))
    c.disputes.draw(world.owner, dispute_id)
    first, *silent = seated(world, dispute_id, jurors)
    verdict(world, dispute_id, first, False)
    world.chain.time_travel(c.disputes.verdict_period() + 1)
    receipt = c.disputes.replace_silent(world.owner, dispute_id)
    penalty = c.disputes.silent_penalty()
    expected = []
    for juror in silent:
        expected += [
            ev("VerifierRegistry", "AssignmentsChanged", verifier=juror.address, assignments=0),
            ev(
                "VerifierRegistry",
                "VerifierPenalized",
                verifier=juror.address,
                amount=penalty,
                recipient=c.disputes.address,
                stake=V_STAKE - penalty,
            ),
            v_transfer(world, c.verifiers.address, c.disputes.address, penalty),
            ev(
                "DisputeManager",
                "JurorReplaced",
                dispute_id=dispute_id,
                verifier=juror.address,
                penalty=penalty,
            ),
        ]
    assert logged(world, receipt) == expected


@case("DisputeManager", "cancel")
def dispute_cancel(world: DevWorld) -> None:
    c = world.contracts
    dispute_id = open_dispute(world, settled_session(world))  # no verifier to draw
    challenger = c.disputes.get_dispute(dispute_id).challenger
    world.chain.time_travel(c.disputes.verdict_period() + 1)
    receipt = c.disputes.cancel(world.owner, dispute_id)
    assert logged(world, receipt) == [
        ev(
            "DisputeManager",
            "Credited",
            account=challenger,
            dispute_id=dispute_id,
            amount=bond_of(world),
        ),
        ev("DisputeManager", "DisputeCancelled", dispute_id=dispute_id),
    ]


@case("DisputeManager", "release_exposure")
def dispute_release_exposure(world: DevWorld) -> None:
    c = world.contracts
    session_id = settled_session(world)
    paid = c.marketplace.dispute_facts(session_id).paid
    world.chain.time_travel(c.disputes.dispute_window() + 1)
    receipt = c.disputes.release_exposure(world.owner, session_id)
    h = world.host.address
    assert logged(world, receipt) == [
        ev("DisputeManager", "ExposureReleased", session_id=session_id, host=h, amount=paid),
        ev("NodeRegistry", "ExposureChanged", host=h, exposure=0),
    ]


@case("DisputeManager", "withdraw")
def dispute_withdraw(world: DevWorld) -> None:
    c = world.contracts
    dispute_id = open_dispute(world, settled_session(world))
    challenger = c.disputes.get_dispute(dispute_id).challenger
    world.chain.time_travel(c.disputes.verdict_period() + 1)
    c.disputes.cancel(world.owner, dispute_id)
    receipt = world.chain.sender(dev_account("challenger")).transact(
        c.disputes.contract.functions.withdraw()
    )
    assert logged(world, receipt) == [
        ev("DisputeManager", "Withdrawn", account=challenger, amount=bond_of(world)),
        v_transfer(world, c.disputes.address, challenger, bond_of(world)),
    ]


# The table, and what it must cover ----------------------------------------------------


@pytest.mark.parametrize(
    "run", [run for _, _, run in CASES], ids=[f"{c}.{f}:{run.__name__}" for c, f, run in CASES]
)
def test_function_logs_its_changes(world: DevWorld, run: Case) -> None:
    run(world)


def test_every_state_changing_function_has_a_case() -> None:
    state_changing = {
        (name, entry["name"])
        for name, compiled in compile_all().items()
        for entry in compiled.abi
        if entry["type"] == "function" and entry["stateMutability"] not in ("view", "pure")
    }
    covered = {(contract, function) for contract, function, _ in CASES}
    assert sorted(state_changing - covered) == [], "state-changing functions without a case"
    assert sorted(covered - state_changing) == [], "cases for functions that do not exist"


def test_constructors_log_the_roles_they_set(world: DevWorld) -> None:
    c = world.contracts
    o = world.owner.address
    owned = ("OwnershipTransferred", {"previous_owner": ZERO, "new_owner": o})
    args: dict[str, tuple[Any, ...]] = {
        "NodeRegistry": registry_args(world, 1),
        "VerifierRegistry": (c.token.address, 1, 0),
        "DisputeManager": (
            c.token.address,
            c.marketplace.address,
            c.nodes.address,
            c.verifiers.address,
            1,
            1,
            3,
            1,
            0,
            20_000,
            0,
            0,
        ),
        "JobMarketplace": (
            c.token.address,
            c.nodes.address,
            c.models.address,
            c.earnings.address,
            o,
            250,
            1,
            10,
            60,
        ),
    }
    extra_logs: dict[str, list[tuple[str, dict[str, Any]]]] = {
        "JobMarketplace": [("TreasuryUpdated", {"treasury": o}), ("FeeUpdated", {"fee_bps": 250})],
    }
    for name, compiled in compile_all().items():
        factory = world.chain.w3.eth.contract(abi=compiled.abi, bytecode=compiled.bytecode)
        receipt = world.owner.transact(factory.constructor(*args.get(name, ())))
        contract = world.chain.w3.eth.contract(address=receipt["contractAddress"], abi=compiled.abi)
        roles = [] if name == "DisputeManager" else [owned]  # no owner: every parameter is fixed
        expected = [(name, event, fields) for event, fields in [*roles, *extra_logs.get(name, [])]]
        assert logged(world, receipt, {name: contract}) == expected, name


# A watcher that only follows NodeRegistry events --------------------------------------


@dataclass
class SeenHost:
    """A host as rebuilt from its NodeRegistry events alone."""

    api_url: str = ""
    stake: int = 0
    active: bool = False
    registered: bool = False
    unbonding_ends_at: int = 0
    prices: dict[bytes, tuple[int, int]] = field(default_factory=dict)

    def apply(self, event: str, args: dict[str, Any]) -> None:
        if event == "HostRegistered":
            self.registered, self.api_url, self.stake = True, args["api_url"], args["stake"]
        elif event == "HostDeregistered":
            self.registered, self.api_url, self.unbonding_ends_at = False, "", 0
        elif event == "HostActiveChanged":
            self.active = args["active"]
        elif event == "HostUrlUpdated":
            self.api_url = args["api_url"]
        elif event == "ModelPriceSet":
            prices = (args["input_price_per_mtok"], args["output_price_per_mtok"])
            if prices[1]:
                self.prices[args["model_id"]] = prices
            else:
                self.prices.pop(args["model_id"], None)
        elif event in ("StakeAdded", "HostSlashed"):
            self.stake = args["stake"]
        elif event == "StakeWithdrawn":
            self.stake -= args["amount"]
        elif event == "UnbondingStarted":
            self.unbonding_ends_at = args["unbonding_ends_at"]
        elif event == "UnbondingCancelled":
            self.unbonding_ends_at = 0


def test_a_watcher_of_events_sees_what_the_registry_stores(world: DevWorld) -> None:
    world, judge = slashable(world)
    c, nodes, h = world.contracts, world.contracts.nodes, world.host.address
    second = second_model(world)
    seen = SeenHost()

    def follow(receipt: TxReceipt) -> None:
        """Apply the host's NodeRegistry events in ``receipt``, then compare with storage."""
        for label, event, args in logged(world, receipt):
            if label == "NodeRegistry" and args.get("host") == h:
                seen.apply(event, args)
        stored = nodes.get_host(h)
        assert seen == SeenHost(
            api_url=stored.api_url,
            stake=stored.stake,
            active=stored.active,
            registered=stored.registered,
            unbonding_ends_at=stored.unbonding_ends_at,
            prices={m: tuple(nodes.prices_of(h, m)) for m in nodes.host_models(h)},
        )

    def withdraw_after_delay() -> TxReceipt:
        world.chain.time_travel(c.deployment.params.unbonding_delay + 1)
        return nodes.withdraw_stake(world.host)

    # The world registered its host before this test: start from that receipt.
    (registered,) = [
        log
        for log in nodes.contract.events.HostRegistered().get_logs(from_block=0)
        if log["args"]["host"] == h
    ]
    follow(world.chain.w3.eth.get_transaction_receipt(registered["transactionHash"]))
    steps: list[Callable[[], TxReceipt]] = [
        lambda: nodes.set_models(world.host, {world.model_id: (1, 2), second: (0, 3)}),
        lambda: nodes.update_url(world.host, URL),
        lambda: slash(world, judge, 1),
        lambda: add_stake(world, 1),
        lambda: nodes.request_unstake(world.host),
        lambda: slash(world, judge, 2),
        lambda: add_stake(world, 2),
        lambda: nodes.cancel_unstake(world.host),
        lambda: nodes.request_unstake(world.host),
        withdraw_after_delay,
        lambda: c.token.approve(world.host, nodes.address, min_stake(world)),
        lambda: nodes.register(world.host, "ws://back", {second: (4, 5)}, min_stake(world)),
    ]
    for step in steps:
        follow(step())
