"""Every state-changing function logs what it changed, on both chains.

Each case calls one external function where it changes something and compares
the receipt's whole log, in order and with its arguments, against what it should
say. A meta-test reads the ABIs, so a function added without a case fails here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from eth_account import Account
from eth_utils import keccak
from web3.contract import Contract
from web3.types import TxReceipt

from inferledger.chain.compile import compile_all
from inferledger.chain.devchain import DevWorld
from inferledger.chain.tx import TxSender
from inferledger.chain.units import settlement_split, usdc
from support import INPUT_PRICE, PRICE, PROOF, URI, deploy_contract, open_session, sign

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


def slash(world: DevWorld, amount: int) -> TxReceipt:
    return world.contracts.nodes.slash(world.owner, world.host.address, amount, world.user.address)


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
    slash(world, 1)
    receipt = add_stake(world, 1)
    h = world.host.address
    assert logged(world, receipt) == [
        ev("NodeRegistry", "StakeAdded", host=h, amount=1, stake=min_stake(world)),
        active_changed(h, True),
        stake_in(world, 1),
    ]


@case("NodeRegistry", "add_stake")
def add_stake_while_unbonding(world: DevWorld) -> None:
    world.contracts.nodes.request_unstake(world.host)
    slash(world, 1)
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
    slash(world, 1)
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
    add_stake(world, 3)
    receipt = slash(world, 3)
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
    receipt = slash(world, 1)
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


def fresh_nodes(world: DevWorld) -> tuple[Contract, TxSender]:
    c = world.contracts
    return fake_marketplace(
        world, "NodeRegistry", c.token.address, c.models.address, min_stake(world), 0
    )


@case("NodeRegistry", "session_opened")
def session_opened(world: DevWorld) -> None:
    nodes, marketplace = fresh_nodes(world)
    receipt = marketplace.transact(nodes.functions.session_opened(world.host.address))
    assert logged(world, receipt, {"fresh": nodes}) == [
        ev("fresh", "SessionCountChanged", host=world.host.address, open_sessions=1)
    ]


@case("NodeRegistry", "session_closed")
def session_closed(world: DevWorld) -> None:
    nodes, marketplace = fresh_nodes(world)
    marketplace.transact(nodes.functions.session_opened(world.host.address))
    receipt = marketplace.transact(nodes.functions.session_closed(world.host.address))
    assert logged(world, receipt, {"fresh": nodes}) == [
        ev("fresh", "SessionCountChanged", host=world.host.address, open_sessions=0)
    ]


@case("NodeRegistry", "set_marketplace")
def nodes_set_marketplace(world: DevWorld) -> None:
    c = world.contracts
    nodes = deploy_contract(world, "NodeRegistry", c.token.address, c.models.address, 1, 0)
    receipt = world.owner.transact(nodes.functions.set_marketplace(world.user.address))
    assert logged(world, receipt, {"fresh": nodes}) == [
        ev("fresh", "MarketplaceSet", marketplace=world.user.address)
    ]


@case("NodeRegistry", "set_arbiter")
def set_arbiter(world: DevWorld) -> None:
    receipt = world.owner.transact(nodes_fn(world).set_arbiter(world.user.address))
    assert logged(world, receipt) == [ev("NodeRegistry", "ArbiterSet", arbiter=world.user.address)]


@case("NodeRegistry", "transfer_ownership")
def nodes_transfer_ownership(world: DevWorld) -> None:
    receipt = world.owner.transact(nodes_fn(world).transfer_ownership(world.user.address))
    assert logged(world, receipt) == [
        ev(
            "NodeRegistry",
            "OwnershipTransferred",
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
        "NodeRegistry": (c.token.address, c.models.address, 1, 0),
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
        "NodeRegistry": [("ArbiterSet", {"arbiter": o})],
        "JobMarketplace": [("TreasuryUpdated", {"treasury": o}), ("FeeUpdated", {"fee_bps": 250})],
    }
    for name, compiled in compile_all().items():
        factory = world.chain.w3.eth.contract(abi=compiled.abi, bytecode=compiled.bytecode)
        receipt = world.owner.transact(factory.constructor(*args.get(name, ())))
        contract = world.chain.w3.eth.contract(address=receipt["contractAddress"], abi=compiled.abi)
        expected = [(name, event, fields) for event, fields in [owned, *extra_logs.get(name, [])]]
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
        lambda: slash(world, 1),
        lambda: add_stake(world, 1),
        lambda: nodes.request_unstake(world.host),
        lambda: slash(world, 2),
        lambda: add_stake(world, 2),
        lambda: nodes.cancel_unstake(world.host),
        lambda: nodes.request_unstake(world.host),
        withdraw_after_delay,
        lambda: c.token.approve(world.host, nodes.address, min_stake(world)),
        lambda: nodes.register(world.host, "ws://back", {second: (4, 5)}, min_stake(world)),
    ]
    for step in steps:
        follow(step())
