"""A ready-to-use world on a dev chain: contracts, an owner, a host and a user.

Used by the demo, the benchmarks and the tests, so all three exercise the same
setup. Keys are derived from fixed labels: they are public and for dev chains only.
"""

from __future__ import annotations

from dataclasses import dataclass

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak

from inferledger.chain.connect import Chain
from inferledger.chain.contracts import Contracts
from inferledger.chain.deploy import deploy
from inferledger.chain.deployment import DeployParams
from inferledger.chain.tx import TxSender
from inferledger.chain.units import usdc

GAS_MONEY = 100 * 10**18
DEV_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/smollm2-135m-instruct-q8_0.gguf"


def dev_account(label: str) -> LocalAccount:
    """A deterministic, publicly known account for dev chains."""
    return Account.from_key(keccak(text=f"inferledger-dev:{label}"))


@dataclass
class DevWorld:
    chain: Chain
    contracts: Contracts
    owner: TxSender
    host: TxSender
    user: TxSender
    model_id: bytes

    def funded_sender(self, label: str, usdc_amount: int = 0) -> TxSender:
        """A new dev account with gas money and ``usdc_amount`` base units of TestUSDC."""
        sender = self.chain.sender(dev_account(label))
        self.chain.fund(sender.address, GAS_MONEY)
        if usdc_amount:
            self.contracts.token.mint(sender, sender.address, usdc_amount)
        return sender


def build_dev_world(
    chain: Chain,
    *,
    params: DeployParams | None = None,
    host_price_per_mtok: int = 2_000_000_000,
    host_url: str = "ws://127.0.0.1:8545",
    model_name: str = DEV_MODEL_NAME,
    weights_sha256: bytes = b"\x01" * 32,
) -> DevWorld:
    """Deploy everything, approve one model and register one host serving it."""
    owner = chain.sender(dev_account("owner"))
    chain.fund(owner.address, GAS_MONEY)
    contracts = deploy(chain, owner, params)
    model_id = contracts.models.approve_model(owner, model_name, weights_sha256)
    world = DevWorld(chain, contracts, owner, owner, owner, model_id)
    world.host = world.funded_sender("host", usdc("100"))
    world.user = world.funded_sender("user", usdc("100"))
    stake = contracts.deployment.params.min_stake
    contracts.token.approve(world.host, contracts.nodes.address, stake)
    contracts.nodes.register(world.host, host_url, {model_id: host_price_per_mtok}, stake)
    return world
