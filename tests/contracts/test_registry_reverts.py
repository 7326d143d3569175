"""Every revert path of ModelRegistry and NodeRegistry, plus the state around them."""

from __future__ import annotations

from typing import Any

from eth_utils import keccak

from inferledger.chain.contracts import NodeRegistry
from inferledger.chain.devchain import DevWorld
from inferledger.chain.tx import TxSender
from inferledger.chain.units import usdc
from support import (
    PROOF,
    URI,
    deploy_contract,
    deploy_failing_token,
    next_tx_at,
    open_session,
    registry_args,
    reverts,
    sign,
    slash,
    slashable_registry,
)

ZERO = "0x0000000000000000000000000000000000000000"
HASH = b"\x02" * 32
PRICES = (500_000_000, 2_000_000_000)  # (input, output) per Mtok
URL = "ws://10.0.0.2:9000"
UNKNOWN_MODEL = keccak(text="not/approved.gguf")


def is_active(world: DevWorld, host: str) -> bool:
    return world.contracts.nodes.contract.functions.is_active(host).call()


def min_stake(world: DevWorld) -> int:
    return world.contracts.deployment.params.min_stake


def delay(world: DevWorld) -> int:
    return world.contracts.deployment.params.unbonding_delay


def approved_model(world: DevWorld, name: str = "org/repo/second.gguf") -> bytes:
    return world.contracts.models.approve_model(world.owner, name, HASH)


def new_host(world: DevWorld, label: str, allowance: int | None = None) -> TxSender:
    """A funded, unregistered account that has approved ``allowance`` (default min stake)."""
    host = world.funded_sender(label, usdc("100"))
    amount = min_stake(world) if allowance is None else allowance
    if amount:
        world.contracts.token.approve(host, world.contracts.nodes.address, amount)
    return host


def register_raw(
    world: DevWorld,
    host: TxSender,
    models: list[bytes],
    input_prices: list[int],
    output_prices: list[int],
) -> None:
    """Register with the three arrays as given (the wrapper cannot build mismatched ones)."""
    nodes = world.contracts.nodes
    host.transact(
        nodes.contract.functions.register(
            URL, models, input_prices, output_prices, min_stake(world)
        )
    )


# ModelRegistry -------------------------------------------------------------------


def test_approve_model_reverts(world: DevWorld) -> None:
    models = world.contracts.models
    count = models.contract.functions.model_count().call()
    with reverts("ModelRegistry: caller is not the owner"):
        models.approve_model(world.host, "a/b.gguf", HASH)
    with reverts("ModelRegistry: empty model name"):
        models.approve_model(world.owner, "", HASH)
    with reverts("ModelRegistry: empty weights hash"):
        models.approve_model(world.owner, "a/b.gguf", b"\x00" * 32)
    assert models.contract.functions.model_count().call() == count
    assert not models.is_approved(keccak(text="a/b.gguf"))


def test_revoke_model_reverts_and_reapproval(world: DevWorld) -> None:
    models = world.contracts.models
    with reverts("ModelRegistry: caller is not the owner"):
        models.revoke_model(world.host, world.model_id)
    assert models.is_approved(world.model_id)
    with reverts("ModelRegistry: model not approved"):
        models.revoke_model(world.owner, UNKNOWN_MODEL)
    models.revoke_model(world.owner, world.model_id)
    assert not models.is_approved(world.model_id)
    with reverts("ModelRegistry: model not approved"):
        models.revoke_model(world.owner, world.model_id)
    count = models.contract.functions.model_count().call()
    # Re-approving a revoked id works, updates the hash and does not list it twice.
    name = models.contract.functions.models(world.model_id).call()[0]
    assert models.approve_model(world.owner, name, HASH) == world.model_id
    assert models.is_approved(world.model_id)
    assert models.weights_sha256(world.model_id) == HASH
    assert models.contract.functions.model_count().call() == count


def test_model_registry_transfer_ownership(world: DevWorld) -> None:
    models = world.contracts.models
    fn = models.contract.functions
    with reverts("ModelRegistry: caller is not the owner"):
        world.host.transact(fn.transfer_ownership(world.host.address))
    with reverts("ModelRegistry: new owner is the zero address"):
        world.owner.transact(fn.transfer_ownership(ZERO))
    assert fn.owner().call() == world.owner.address
    world.owner.transact(fn.transfer_ownership(world.host.address))
    assert fn.owner().call() == world.host.address
    with reverts("ModelRegistry: caller is not the owner"):
        models.approve_model(world.owner, "a/b.gguf", HASH)
    assert models.is_approved(models.approve_model(world.host, "a/b.gguf", HASH))


# NodeRegistry: register ----------------------------------------------------------


def test_register_reverts(world: DevWorld) -> None:
    c = world.contracts
    nodes = c.nodes
    host = new_host(world, "h2")
    stake = min_stake(world)
    with reverts("NodeRegistry: already registered"):
        nodes.register(world.host, URL, {world.model_id: PRICES}, stake)
    with reverts("NodeRegistry: empty API URL"):
        nodes.register(host, "", {world.model_id: PRICES}, stake)
    with reverts("NodeRegistry: stake below minimum"):
        nodes.register(host, URL, {world.model_id: PRICES}, stake - 1)
    with reverts("NodeRegistry: no models"):
        nodes.register(host, URL, {}, stake)
    inp, out = PRICES
    for input_prices, output_prices in [
        ([], [out]),
        ([inp], []),
        ([inp, inp], [out]),
        ([inp], [out, out]),
    ]:
        with reverts("NodeRegistry: models and prices differ in length"):
            register_raw(world, host, [world.model_id], input_prices, output_prices)
    with reverts("NodeRegistry: model not approved"):
        nodes.register(host, URL, {UNKNOWN_MODEL: PRICES}, stake)
    for zero_output in [(0, 0), (inp, 0)]:
        with reverts("NodeRegistry: zero price"):
            nodes.register(host, URL, {world.model_id: zero_output}, stake)
    with reverts("NodeRegistry: duplicate model"):
        register_raw(world, host, [world.model_id, world.model_id], [inp, inp], [out, out])
    with reverts("NodeRegistry: duplicate model"):  # also with a free prompt
        register_raw(world, host, [world.model_id, world.model_id], [0, 0], [out, out])
    # Nothing of the failed attempts stuck.
    assert nodes.hosts() == [world.host.address]
    assert not nodes.get_host(host.address).registered
    assert nodes.prices_of(host.address, world.model_id) == (0, 0)
    assert c.token.balance_of(host.address) == usdc("100")
    # The same account registers fine afterwards.
    nodes.register(host, URL, {world.model_id: PRICES}, stake)
    assert nodes.prices_of(host.address, world.model_id) == PRICES
    info = nodes.get_host(host.address)
    assert (info.registered, info.active, info.stake, info.api_url) == (True, True, stake, URL)
    assert nodes.hosts() == [world.host.address, host.address]
    assert c.token.balance_of(host.address) == usdc("100") - stake


def test_register_with_revoked_model_reverts(world: DevWorld) -> None:
    host = new_host(world, "h2")
    world.contracts.models.revoke_model(world.owner, world.model_id)
    with reverts("NodeRegistry: model not approved"):
        world.contracts.nodes.register(host, URL, {world.model_id: PRICES}, min_stake(world))


def test_register_pulls_stake_with_allowance_only(world: DevWorld) -> None:
    c = world.contracts
    host = new_host(world, "h2", allowance=0)
    with reverts("TestUSDC: allowance too low"):
        c.nodes.register(host, URL, {world.model_id: PRICES}, min_stake(world))
    c.token.approve(host, c.nodes.address, min_stake(world) - 1)
    with reverts("TestUSDC: allowance too low"):
        c.nodes.register(host, URL, {world.model_id: PRICES}, min_stake(world))
    assert not c.nodes.get_host(host.address).registered
    assert c.nodes.hosts() == [world.host.address]
    assert c.token.balance_of(host.address) == usdc("100")


# NodeRegistry: host self-service ---------------------------------------------------


def test_update_url(world: DevWorld) -> None:
    nodes = world.contracts.nodes
    stranger = world.funded_sender("stranger")
    with reverts("NodeRegistry: not registered"):
        nodes.update_url(stranger, URL)
    with reverts("NodeRegistry: empty API URL"):
        nodes.update_url(world.host, "")
    assert nodes.get_host(world.host.address).api_url == "ws://127.0.0.1:8545"
    nodes.update_url(world.host, URL)
    assert nodes.get_host(world.host.address).api_url == URL


def test_set_models_reverts(world: DevWorld) -> None:
    nodes = world.contracts.nodes
    fn = nodes.contract.functions
    stranger = world.funded_sender("stranger")
    second = approved_model(world)
    with reverts("NodeRegistry: not registered"):
        nodes.set_models(stranger, {world.model_id: PRICES})
    with reverts("NodeRegistry: no models"):
        nodes.set_models(world.host, {})
    with reverts("NodeRegistry: models and prices differ in length"):
        world.host.transact(fn.set_models([world.model_id, second], [1, 1], [PRICES[1]]))
    with reverts("NodeRegistry: models and prices differ in length"):
        world.host.transact(fn.set_models([world.model_id, second], [1], [2, 2]))
    with reverts("NodeRegistry: model not approved"):
        nodes.set_models(world.host, {second: PRICES, UNKNOWN_MODEL: PRICES})
    with reverts("NodeRegistry: zero price"):
        nodes.set_models(world.host, {second: (5, 0)})
    with reverts("NodeRegistry: duplicate model"):
        world.host.transact(fn.set_models([second, second], [1, 1], [2, 2]))
    # The old list survived every failed replacement.
    assert nodes.host_models(world.host.address) == [world.model_id]
    assert nodes.prices_of(world.host.address, world.model_id) == PRICES
    assert nodes.prices_of(world.host.address, second) == (0, 0)


def test_set_models_replaces_prices(world: DevWorld) -> None:
    nodes = world.contracts.nodes
    host = world.host.address
    second = approved_model(world)
    receipt = nodes.set_models(world.host, {second: (0, 5)})  # a free prompt is allowed
    assert nodes.host_models(host) == [second]
    assert nodes.prices_of(host, second) == (0, 5)
    assert nodes.prices_of(host, world.model_id) == (0, 0)
    # The old model's prices are logged as cleared, then the new ones as set.
    assert price_events(nodes, receipt) == [(world.model_id, 0, 0), (second, 0, 5)]
    # Re-listing a model that is already listed is a new price, not a duplicate.
    nodes.set_models(world.host, {second: (3, 7), world.model_id: (4, 9)})
    assert nodes.host_models(host) == [second, world.model_id]
    assert (nodes.prices_of(host, second), nodes.prices_of(host, world.model_id)) == (
        (3, 7),
        (4, 9),
    )


def price_events(nodes: NodeRegistry, receipt: Any) -> list[tuple[bytes, int, int]]:
    """The (model id, input price, output price) of each ModelPriceSet in ``receipt``."""
    return [
        (
            bytes(e["args"]["model_id"]),
            e["args"]["input_price_per_mtok"],
            e["args"]["output_price_per_mtok"],
        )
        for e in nodes._events("ModelPriceSet", receipt)
    ]


def test_register_logs_both_prices(world: DevWorld) -> None:
    nodes = world.contracts.nodes
    host = new_host(world, "h2")
    second = approved_model(world)
    receipt = nodes.register(host, URL, {world.model_id: PRICES, second: (0, 1)}, min_stake(world))
    assert price_events(nodes, receipt) == [(world.model_id, *PRICES), (second, 0, 1)]
    assert nodes.prices_of(host.address, second) == (0, 1)


def test_add_stake(world: DevWorld) -> None:
    c = world.contracts
    stranger = world.funded_sender("stranger", usdc("5"))
    c.token.approve(stranger, c.nodes.address, usdc("5"))
    with reverts("NodeRegistry: not registered"):
        c.nodes.add_stake(stranger, usdc("5"))
    with reverts("NodeRegistry: zero amount"):
        c.nodes.add_stake(world.host, 0)
    with reverts("TestUSDC: allowance too low"):
        c.nodes.add_stake(world.host, usdc("5"))
    assert c.nodes.get_host(world.host.address).stake == min_stake(world)
    c.token.approve(world.host, c.nodes.address, usdc("5"))
    c.nodes.add_stake(world.host, usdc("5"))
    assert c.nodes.get_host(world.host.address).stake == min_stake(world) + usdc("5")
    assert c.token.balance_of(c.nodes.address) == min_stake(world) + usdc("5")


# NodeRegistry: unbonding -------------------------------------------------------------


def test_request_unstake(world: DevWorld) -> None:
    nodes = world.contracts.nodes
    stranger = world.funded_sender("stranger")
    with reverts("NodeRegistry: not registered"):
        nodes.request_unstake(stranger)
    receipt = nodes.request_unstake(world.host)
    requested_at = world.chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"]
    info = nodes.get_host(world.host.address)
    assert info.unbonding_ends_at == requested_at + delay(world)
    assert not info.active
    world.chain.time_travel(60)
    with reverts("NodeRegistry: already unbonding"):
        nodes.request_unstake(world.host)
    assert nodes.get_host(world.host.address).unbonding_ends_at == info.unbonding_ends_at


def test_cancel_unstake(world: DevWorld) -> None:
    nodes = world.contracts.nodes
    with reverts("NodeRegistry: not unbonding"):
        nodes.cancel_unstake(world.host)
    nodes.request_unstake(world.host)
    nodes.cancel_unstake(world.host)
    info = nodes.get_host(world.host.address)
    assert (info.active, info.unbonding_ends_at) == (True, 0)
    with reverts("NodeRegistry: not unbonding"):
        nodes.cancel_unstake(world.host)


def test_cancel_unstake_below_min_stake_after_slash(world: DevWorld) -> None:
    c = world.contracts
    nodes, judge = slashable_registry(world)
    nodes.request_unstake(world.host)
    slash(nodes, judge, world.host.address, 1, world.owner.address)
    with reverts("NodeRegistry: stake below minimum"):
        nodes.cancel_unstake(world.host)
    info = nodes.get_host(world.host.address)
    assert not info.active and info.unbonding_ends_at != 0
    # Topping the stake back up makes cancelling possible again.
    c.token.approve(world.host, nodes.address, 1)
    nodes.add_stake(world.host, 1)
    nodes.cancel_unstake(world.host)
    assert nodes.get_host(world.host.address).active


def test_withdraw_stake_not_unbonding(world: DevWorld) -> None:
    nodes = world.contracts.nodes
    stranger = world.funded_sender("stranger")
    with reverts("NodeRegistry: not unbonding"):
        nodes.withdraw_stake(world.host)
    with reverts("NodeRegistry: not unbonding"):
        nodes.withdraw_stake(stranger)
    assert nodes.get_host(world.host.address).registered


def test_withdraw_stake_exactly_at_unbonding_end(world: DevWorld) -> None:
    c = world.contracts
    nodes = c.nodes
    nodes.request_unstake(world.host)
    ends_at = nodes.get_host(world.host.address).unbonding_ends_at
    before = c.token.balance_of(world.host.address)
    with reverts("NodeRegistry: still unbonding"):
        nodes.withdraw_stake(world.host)
    next_tx_at(world.chain, ends_at - 1)
    with reverts("NodeRegistry: still unbonding"):
        nodes.withdraw_stake(world.host)
    assert nodes.get_host(world.host.address).registered
    next_tx_at(world.chain, ends_at)
    receipt = nodes.withdraw_stake(world.host)
    assert world.chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"] == ends_at
    assert c.token.balance_of(world.host.address) == before + min_stake(world)


def test_withdraw_blocked_by_open_session_then_reregister(world: DevWorld) -> None:
    c = world.contracts
    nodes = c.nodes
    host = world.host.address
    session_id, signer = open_session(world)
    c.marketplace.submit_checkpoint(
        world.host, session_id, 30, 100, PROOF, URI, sign(world, signer, session_id, 30, 100)
    )
    assert nodes.get_host(host).open_sessions == 1
    nodes.request_unstake(world.host)
    world.chain.time_travel(delay(world) + 10)
    with reverts("NodeRegistry: host has open sessions"):
        nodes.withdraw_stake(world.host)
    assert nodes.get_host(host).registered
    assert c.token.balance_of(nodes.address) == min_stake(world)

    # The session expired long ago: anyone may settle it at its last checkpoint.
    settled = c.marketplace.finalize(world.user, session_id)
    assert (settled.input_tokens, settled.output_tokens) == (30, 100)
    assert nodes.get_host(host).open_sessions == 0
    # What the session paid stays at stake until its dispute window is released.
    paid = c.marketplace.dispute_facts(session_id).paid
    assert nodes.get_host(host).exposure == paid > 0
    with reverts("NodeRegistry: host has unreleased exposure"):
        nodes.withdraw_stake(world.host)
    with reverts("DisputeManager: dispute window still open"):
        c.disputes.release_exposure(world.user, session_id)
    world.chain.time_travel(c.disputes.dispute_window() + 1)
    c.disputes.release_exposure(world.user, session_id)
    assert nodes.get_host(host).exposure == 0
    before = c.token.balance_of(host)
    receipt = nodes.withdraw_stake(world.host)
    # Withdrawing clears the prices, and says so.
    assert price_events(nodes, receipt) == [(world.model_id, 0, 0)]
    assert c.token.balance_of(host) == before + min_stake(world)
    assert c.token.balance_of(nodes.address) == 0
    info = nodes.get_host(host)
    assert (info.registered, info.active, info.stake, info.api_url) == (False, False, 0, "")
    assert nodes.host_models(host) == []
    assert nodes.prices_of(host, world.model_id) == (0, 0)
    with reverts("NodeRegistry: not unbonding"):
        nodes.withdraw_stake(world.host)

    # Coming back: a fresh registration, listed once.
    c.token.approve(world.host, nodes.address, min_stake(world))
    nodes.register(world.host, URL, {world.model_id: (1, PRICES[1] + 1)}, min_stake(world))
    info = nodes.get_host(host)
    assert (info.registered, info.active, info.api_url) == (True, True, URL)
    assert nodes.prices_of(host, world.model_id) == (1, PRICES[1] + 1)
    assert nodes.hosts() == [host]
    assert nodes.contract.functions.host_count().call() == 1


# NodeRegistry: slashing --------------------------------------------------------------


def test_slash_reverts(world: DevWorld) -> None:
    c = world.contracts
    nodes, judge = slashable_registry(world)
    host = world.host.address
    stake = min_stake(world)
    stranger = world.funded_sender("stranger")
    # Nobody but the dispute contract slashes: not the owner, not the host.
    for caller in (world.owner, world.host):
        with reverts("NodeRegistry: caller is not the disputes contract"):
            slash(nodes, caller, host, 1, caller.address)
        with reverts("NodeRegistry: caller is not the disputes contract"):
            slash(c.nodes, caller, host, 1, caller.address)
    with reverts("NodeRegistry: recipient is the zero address"):
        slash(nodes, judge, host, 1, ZERO)
    with reverts("NodeRegistry: not registered"):
        slash(nodes, judge, stranger.address, 1, judge.address)
    with reverts("NodeRegistry: bad slash amount"):
        slash(nodes, judge, host, 0, judge.address)
    with reverts("NodeRegistry: bad slash amount"):
        slash(nodes, judge, host, stake + 1, judge.address)
    info = nodes.get_host(host)
    assert (info.stake, info.active) == (stake, True)
    assert c.token.balance_of(nodes.address) == stake


def test_the_owner_has_no_way_to_move_a_hosts_stake(world: DevWorld) -> None:
    """The old arbiter could take any host's whole stake to any address; nothing the
    owner can call now touches a stake (the dispute contract is set once, at deployment)."""
    c = world.contracts
    functions = {e["name"] for e in c.nodes.contract.abi if e["type"] == "function"}
    assert not {"set_arbiter", "arbiter"} & functions
    fn = c.nodes.contract.functions
    with reverts("NodeRegistry: disputes already set"):
        world.owner.transact(fn.set_disputes(world.owner.address))
    assert fn.disputes().call() == c.disputes.address
    with reverts("NodeRegistry: caller is not the disputes contract"):
        world.owner.transact(fn.release_exposure(world.host.address, 0))
    assert c.nodes.get_host(world.host.address).stake == min_stake(world)


def test_slash_pays_recipient_and_deactivates_below_min(world: DevWorld) -> None:
    c = world.contracts
    nodes, judge = slashable_registry(world)
    host = world.host.address
    stake = min_stake(world)
    recipient = world.funded_sender("victim").address
    c.token.approve(world.host, nodes.address, usdc("1"))
    nodes.add_stake(world.host, usdc("1"))
    # Leaving exactly the minimum keeps the host active.
    slash(nodes, judge, host, usdc("1"), recipient)
    assert (nodes.get_host(host).stake, nodes.get_host(host).active) == (stake, True)
    slash(nodes, judge, host, 1, recipient)
    info = nodes.get_host(host)
    assert (info.stake, info.active, info.registered) == (stake - 1, False, True)
    assert c.token.balance_of(recipient) == usdc("1") + 1
    # Slashing everything is allowed.
    slash(nodes, judge, host, stake - 1, recipient)
    assert nodes.get_host(host).stake == 0
    assert c.token.balance_of(recipient) == stake + usdc("1")


def test_slashed_host_is_inactive_until_topped_up(world: DevWorld) -> None:
    c = world.contracts
    nodes, judge = slashable_registry(world)
    slash(nodes, judge, world.host.address, 1, world.owner.address)
    assert not nodes.get_host(world.host.address).active
    c.token.approve(world.host, nodes.address, 1)
    nodes.add_stake(world.host, 1)
    assert nodes.get_host(world.host.address).active


def test_exposure_is_capped_by_the_stake(world: DevWorld) -> None:
    """A host holds open deposits (and paid amounts in their dispute window) of at most
    exposure_bps of its stake, so a slash of penalty_bps always covers them."""
    nodes, judge = slashable_registry(world)
    host = world.host.address
    fn = nodes.contract.functions
    cap = min_stake(world) * world.contracts.deployment.params.exposure_bps // 10_000
    judge.transact(fn.session_opened(host, cap - 1))
    with reverts("NodeRegistry: host exposure above its stake cap"):
        judge.transact(fn.session_opened(host, 2))
    judge.transact(fn.session_opened(host, 1))
    assert nodes.get_host(host).exposure == cap
    judge.transact(fn.session_closed(host, 1, 1))  # paid in full: it stays exposed
    judge.transact(fn.session_closed(host, cap - 1, 0))  # paid nothing: released at once
    assert nodes.get_host(host).exposure == 1
    judge.transact(fn.release_exposure(host, 1))
    assert nodes.get_host(host).exposure == 0


def test_a_session_beyond_the_hosts_cap_is_refused(world: DevWorld) -> None:
    c = world.contracts
    cap = min_stake(world) * c.deployment.params.exposure_bps // 10_000
    open_session(world, deposit=cap)
    with reverts("NodeRegistry: host exposure above its stake cap"):
        open_session(world, deposit=usdc("1"))
    assert c.nodes.get_host(world.host.address).exposure == cap


def test_top_up_does_not_reactivate_an_unbonding_host(world: DevWorld) -> None:
    c = world.contracts
    nodes = c.nodes
    nodes.request_unstake(world.host)
    c.token.approve(world.host, nodes.address, 1)
    nodes.add_stake(world.host, 1)
    assert not is_active(world, world.host.address)
    with reverts("JobMarketplace: host not active"):
        open_session(world)


# NodeRegistry: roles -------------------------------------------------------------------


def test_session_counters_are_marketplace_only(world: DevWorld) -> None:
    nodes = world.contracts.nodes
    fn = nodes.contract.functions
    host = world.host.address
    for caller in (world.owner, world.host):
        with reverts("NodeRegistry: caller is not the marketplace"):
            caller.transact(fn.session_opened(host, 1))
    open_session(world)
    for caller in (world.owner, world.host):
        with reverts("NodeRegistry: caller is not the marketplace"):
            caller.transact(fn.session_closed(host, 1, 0))
    assert nodes.get_host(host).open_sessions == 1


def test_set_marketplace(world: DevWorld) -> None:
    c = world.contracts
    fn = c.nodes.contract.functions
    with reverts("NodeRegistry: caller is not the owner"):
        world.host.transact(fn.set_marketplace(world.host.address))
    with reverts("NodeRegistry: marketplace already set"):
        world.owner.transact(fn.set_marketplace(world.host.address))
    assert fn.marketplace().call() == c.marketplace.address
    fresh = deploy_contract(world, "NodeRegistry", *registry_args(world)).functions
    with reverts("NodeRegistry: caller is not the owner"):
        world.host.transact(fresh.set_marketplace(world.host.address))
    with reverts("NodeRegistry: marketplace is the zero address"):
        world.owner.transact(fresh.set_marketplace(ZERO))
    assert fresh.marketplace().call() == ZERO
    world.owner.transact(fresh.set_marketplace(world.host.address))
    assert fresh.marketplace().call() == world.host.address


def test_set_disputes(world: DevWorld) -> None:
    fresh = deploy_contract(world, "NodeRegistry", *registry_args(world)).functions
    with reverts("NodeRegistry: caller is not the owner"):
        world.host.transact(fresh.set_disputes(world.host.address))
    with reverts("NodeRegistry: disputes is the zero address"):
        world.owner.transact(fresh.set_disputes(ZERO))
    assert fresh.disputes().call() == ZERO
    world.owner.transact(fresh.set_disputes(world.user.address))
    assert fresh.disputes().call() == world.user.address
    with reverts("NodeRegistry: disputes already set"):
        world.owner.transact(fresh.set_disputes(world.owner.address))
    with reverts("NodeRegistry: zero exposure cap"):
        args = registry_args(world)
        deploy_contract(world, "NodeRegistry", *args[:4], 0)


def test_node_registry_transfer_ownership(world: DevWorld) -> None:
    fn = world.contracts.nodes.contract.functions
    new_owner = world.funded_sender("new owner")
    with reverts("NodeRegistry: caller is not the owner"):
        world.host.transact(fn.transfer_ownership(world.host.address))
    with reverts("NodeRegistry: new owner is the zero address"):
        world.owner.transact(fn.transfer_ownership(ZERO))
    world.owner.transact(fn.transfer_ownership(new_owner.address))
    # Two steps: the owner stays the owner until the new one accepts.
    assert (fn.owner().call(), fn.pending_owner().call()) == (
        world.owner.address,
        new_owner.address,
    )
    with reverts("NodeRegistry: caller is not the pending owner"):
        world.host.transact(fn.accept_ownership())
    new_owner.transact(fn.accept_ownership())
    assert (fn.owner().call(), fn.pending_owner().call()) == (new_owner.address, ZERO)
    with reverts("NodeRegistry: caller is not the owner"):
        world.owner.transact(fn.transfer_ownership(world.owner.address))


# NodeRegistry with a token that returns False ----------------------------------------------


def test_stake_token_returning_false_reverts_every_transfer(world: DevWorld) -> None:
    token = deploy_failing_token(world)
    nodes = NodeRegistry(
        world.chain,
        deploy_contract(
            world, "NodeRegistry", token.address, world.contracts.models.address, 100, 0, 5000
        ),
    )
    world.owner.transact(nodes.contract.functions.set_disputes(world.owner.address))
    host, other = world.host, world.user
    for account in (host, other):
        world.owner.transact(token.functions.mint(account.address, 1_000))
    nodes.register(host, URL, {world.model_id: PRICES}, 200)
    world.owner.transact(token.functions.set_failing(True))

    with reverts("NodeRegistry: stake transfer failed"):
        nodes.register(other, URL, {world.model_id: PRICES}, 200)
    assert not nodes.get_host(other.address).registered
    assert nodes.hosts() == [host.address]
    with reverts("NodeRegistry: stake transfer failed"):
        nodes.add_stake(host, 50)
    with reverts("NodeRegistry: slash transfer failed"):
        slash(nodes, world.owner, host.address, 50, world.owner.address)
    assert nodes.get_host(host.address).stake == 200
    nodes.request_unstake(host)
    with reverts("NodeRegistry: stake transfer failed"):
        nodes.withdraw_stake(host)
    info = nodes.get_host(host.address)
    assert (info.registered, info.stake) == (True, 200)
    assert nodes.prices_of(host.address, world.model_id) == PRICES
    assert token.functions.balanceOf(nodes.address).call() == 200
    # Once the token works again everything goes through.
    world.owner.transact(token.functions.set_failing(False))
    nodes.withdraw_stake(host)
    assert token.functions.balanceOf(host.address).call() == 1_000
