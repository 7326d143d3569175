"""Client construction: keys, deployments, network presets, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferledger.chain.devchain import DevWorld, dev_account
from inferledger.chain.units import usdc
from inferledger.sdk import NETWORKS, Client, ConfigurationError
from inferledger.sdk.networks import embedded_chain


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("INFERLEDGER_KEY", "INFERLEDGER_DEPLOYMENT_FILE", "INFERLEDGER_NETWORK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("INFERLEDGER_CHAIN_URL", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./deployment.json


def one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_the_key_comes_from_the_argument_or_the_environment(
    world: DevWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = world.contracts.deployment
    reader = Client(world.chain, deployment=deployment)
    assert reader.address is None
    assert reader.hosts.list()  # reads need no key
    with pytest.raises(ConfigurationError) as missing:
        reader.sessions.open(world.host.address, world.model_id, usdc("1"))
    assert "INFERLEDGER_KEY" in one_line(missing)

    user_key = "0x" + dev_account("user").key.hex()
    monkeypatch.setenv("INFERLEDGER_KEY", user_key)
    assert Client(world.chain, deployment=deployment).address == world.user.address
    assert Client(world.chain, deployment=deployment, key=dev_account("host").key).address == (
        world.host.address
    )
    with pytest.raises(ConfigurationError) as bad:
        Client(world.chain, deployment=deployment, key="0x1234")
    assert "not a valid private key" in one_line(bad) and "0x1234" not in str(bad.value)


def test_the_deployment_comes_from_the_argument_the_environment_or_the_working_directory(
    world: DevWorld, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    deployment = world.contracts.deployment
    with pytest.raises(ConfigurationError) as missing:
        Client(world.chain)
    assert "INFERLEDGER_DEPLOYMENT_FILE" in one_line(missing)
    with pytest.raises(ConfigurationError) as absent:
        Client(world.chain, deployment=tmp_path / "nope.json")
    assert "not found" in one_line(absent)

    saved = tmp_path / "elsewhere" / "record.json"
    deployment.save(saved)
    assert Client(world.chain, deployment=saved).deployment == deployment
    assert Client(world.chain, deployment=str(saved)).deployment == deployment
    monkeypatch.setenv("INFERLEDGER_DEPLOYMENT_FILE", str(saved))
    assert Client(world.chain).contracts.marketplace.address == deployment.addresses.marketplace
    monkeypatch.delenv("INFERLEDGER_DEPLOYMENT_FILE")
    deployment.save(tmp_path / "deployment.json")  # what `inferledger deploy` writes
    assert Client(world.chain).deployment == deployment


def test_wrong_chain_ids_are_refused_at_construction(world: DevWorld) -> None:
    deployment = world.contracts.deployment
    foreign = deployment.model_copy(update={"chain_id": deployment.chain_id + 1})
    with pytest.raises(ConfigurationError) as wrong_deployment:
        Client(world.chain, deployment=foreign)
    assert f"chain id {deployment.chain_id + 1}" in one_line(wrong_deployment)
    with pytest.raises(ConfigurationError) as wrong_network:
        Client(world.chain, network="base-sepolia", deployment=deployment)
    assert "84532" in one_line(wrong_network)
    with pytest.raises(ConfigurationError) as unknown:
        Client(world.chain, network="mainnet", deployment=deployment)
    assert "embedded, local, base-sepolia" in one_line(unknown)

    if world.chain.is_embedded:
        with pytest.raises(ConfigurationError, match="31337"):
            Client(world.chain, network="local", deployment=deployment)
    else:  # anvil is chain id 31337, the local preset; its URL overrides the preset's port
        local = Client(world.chain.url, network="local", deployment=deployment)
        assert local.chain.chain_id == 31337 and local.network is NETWORKS["local"]


def test_network_presets() -> None:
    base = NETWORKS["base-sepolia"]
    assert (base.chain_id, base.rpc_url) == (84532, "https://sepolia.base.org")
    assert base.usdc == "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
    assert (NETWORKS["local"].rpc_url, NETWORKS["local"].chain_id) == (
        "http://127.0.0.1:8545",
        31337,
    )
    assert NETWORKS["embedded"].rpc_url == "embedded"


def test_the_default_chain_is_this_processs_embedded_chain(world: DevWorld) -> None:
    if not world.chain.is_embedded:
        pytest.skip("about the embedded chain")
    deployment = world.contracts.deployment
    first = Client(deployment=deployment)
    second = Client("embedded", deployment=deployment)
    assert first.chain is second.chain is embedded_chain()
