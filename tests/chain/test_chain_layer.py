"""The chain layer on both chains: TxSender, reverts, time travel, deployment records."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from inferledger.chain.compile import compile_all
from inferledger.chain.connect import connect
from inferledger.chain.contracts import Contracts
from inferledger.chain.deployment import Deployment
from inferledger.chain.devchain import DevWorld, dev_account
from inferledger.chain.errors import (
    ChainError,
    ChainUnreachable,
    ContractRevert,
    GasCapExceeded,
    TxTimeout,
)


def test_revert_reason_is_one_exception_type_on_both_chains(world: DevWorld) -> None:
    poor = world.funded_sender("poor")
    with pytest.raises(ContractRevert) as info:
        world.contracts.token.transfer(poor, world.user.address, 1)
    assert info.value.reason == "TestUSDC: balance too low"
    assert str(info.value) == "transfer reverted: TestUSDC: balance too low"


def test_concurrent_sends_from_one_key_get_distinct_nonces(world: DevWorld) -> None:
    sender = world.funded_sender("busy", 1_000)
    token = world.contracts.token
    errors: list[Exception] = []

    def pay() -> None:
        try:
            token.transfer(sender, world.user.address, 1)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=pay) for _ in range(8)]
    before = token.balance_of(world.user.address)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert token.balance_of(world.user.address) == before + 8


def test_nonce_conflict_with_another_sender_of_the_same_key_recovers(world: DevWorld) -> None:
    account = dev_account("shared-key")
    world.chain.fund(account.address, 10**18)
    first, second = world.chain.sender(account), world.chain.sender(account)
    first.send_value(world.user.address, 1)
    second.send_value(world.user.address, 1)  # takes the nonce `first` has cached
    receipt = first.send_value(world.user.address, 1)
    assert receipt["status"] == 1
    assert world.chain.w3.eth.get_transaction_count(account.address) == 3


def test_gas_cap_refuses_expensive_transactions(world: DevWorld) -> None:
    capped = world.chain.sender(dev_account("owner"), gas_cap=30_000)
    with pytest.raises(GasCapExceeded, match="INFERLEDGER_GAS_CAP"):
        world.contracts.token.mint(capped, capped.address, 1)


def test_receipt_timeout_names_the_transaction(world: DevWorld) -> None:
    sender = world.chain.sender(dev_account("owner"), receipt_timeout=0.3)
    world.chain.set_automine(False)
    try:
        with pytest.raises(TxTimeout, match="not mined within"):
            sender.send_value(world.user.address, 1)
    finally:
        world.chain.set_automine(True)


def test_time_travel_moves_block_time(world: DevWorld) -> None:
    before = world.chain.now()
    after = world.chain.time_travel(3600)
    assert after >= before + 3600


def test_deployment_round_trips_through_json(world: DevWorld, tmp_path: Path) -> None:
    path = tmp_path / "deployment.json"
    world.contracts.deployment.save(path)
    loaded = Deployment.load(path)
    assert loaded == world.contracts.deployment
    again = Contracts.attach(world.chain, loaded)
    assert again.marketplace.fee_bps() == 1000
    assert again.nodes.get_host(world.host.address).registered


def test_attaching_a_deployment_to_the_wrong_chain_fails(world: DevWorld) -> None:
    wrong = world.contracts.deployment.model_copy(update={"chain_id": 1})
    with pytest.raises(ChainError, match="chain id 1"):
        Contracts.attach(world.chain, wrong)


def test_unreachable_rpc_names_the_url_and_setting() -> None:
    with pytest.raises(ChainUnreachable, match=r"127\.0\.0\.1:9.*INFERLEDGER_CHAIN_URL"):
        connect("http://127.0.0.1:9", timeout=1)


def test_compile_cache_is_reused_and_keyed_on_sources(tmp_path: Path) -> None:
    first = compile_all(tmp_path)
    cached = list(tmp_path.glob("*.json"))
    assert len(cached) == 1
    cached[0].write_text(cached[0].read_text().replace('"TestUSDC"', '"TestUSDC"'))
    mtime = cached[0].stat().st_mtime_ns
    second = compile_all(tmp_path)
    assert cached[0].stat().st_mtime_ns == mtime
    assert first == second
    assert set(first) == {
        "TestUSDC",
        "ModelRegistry",
        "NodeRegistry",
        "HostEarnings",
        "JobMarketplace",
        "VerifierRegistry",
        "DisputeManager",
    }
