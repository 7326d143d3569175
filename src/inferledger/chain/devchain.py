"""A ready-to-use world on a dev chain: contracts, an owner, a host and a user.

Used by the demo, the benchmarks and the tests, so all three exercise the same
setup. Keys are derived from fixed labels: they are public and for dev chains only.
"""

from __future__ import annotations

from dataclasses import dataclass

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak

from inferledger.chain.connect import Chain
from inferledger.chain.contracts import Contracts
from inferledger.chain.deploy import deploy
from inferledger.chain.deployment import DeployParams
from inferledger.chain.receipts import Receipt, sign_receipt
from inferledger.chain.tx import TxSender
from inferledger.chain.units import Prices, usdc

GAS_MONEY = 100 * 10**18
# The dev host's prices per million tokens in base units. Distinct and both nonzero,
# so a test that mixes up input and output tokens gets a wrong figure.
PRICE = 2_000_000_000  # output (completion) tokens: $0.002 per token
INPUT_PRICE = 500_000_000  # input (prompt) tokens: $0.0005 per token
PROOF = keccak(text="proof bundle")
DEV_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/smollm2-135m-instruct-q8_0.gguf"


def dev_account(label: str) -> LocalAccount:
    """A deterministic, publicly known account for dev chains."""
    account: LocalAccount = Account.from_key(keccak(text=f"inferledger-dev:{label}"))
    return account


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
    host_input_price_per_mtok: int = INPUT_PRICE,
    host_output_price_per_mtok: int = PRICE,
    host_url: str = "ws://127.0.0.1:8545",
    model_name: str = DEV_MODEL_NAME,
    weights_sha256: bytes = b"\x01" * 32,
    host_stake: int | None = None,
) -> DevWorld:
    """Deploy everything, approve one model and register one host serving it, staking
    ``host_stake`` (default the minimum; its open deposits are capped at exposure_bps of
    it, so a world that opens many sessions at once stakes more)."""
    owner = chain.sender(dev_account("owner"))
    chain.fund(owner.address, GAS_MONEY)
    contracts = deploy(chain, owner, params)
    model_id = contracts.models.approve_model(owner, model_name, weights_sha256)
    world = DevWorld(chain, contracts, owner, owner, owner, model_id)
    stake = contracts.deployment.params.min_stake if host_stake is None else host_stake
    world.host = world.funded_sender(
        "host", usdc("100") + max(0, stake - contracts.deployment.params.min_stake)
    )
    world.user = world.funded_sender("user", usdc("100"))
    contracts.token.approve(world.host, contracts.nodes.address, stake)
    prices = Prices(host_input_price_per_mtok, host_output_price_per_mtok)
    contracts.nodes.register(world.host, host_url, {model_id: prices}, stake)
    return world


def open_session(
    world: DevWorld,
    *,
    user: TxSender | None = None,
    deposit: int = usdc("2"),
    input_price: int = INPUT_PRICE,
    output_price: int = PRICE,
    proof_interval: int = 100,
    duration: int = 86400,
    signer: LocalAccount | None = None,
    model_id: bytes | None = None,
) -> tuple[int, LocalAccount]:
    """Approve and create a session with the world's host; returns (id, session signer).

    ``input_price``/``output_price``: the most the user accepts (default: the dev prices).
    """
    user = user or world.user
    signer = signer or Account.create()
    c = world.contracts
    c.token.approve(user, c.marketplace.address, deposit)
    session_id = c.marketplace.create_session(
        user,
        host=world.host.address,
        model_id=model_id or world.model_id,
        deposit=deposit,
        max_input_price_per_mtok=input_price,
        max_output_price_per_mtok=output_price,
        max_duration=duration,
        proof_interval=proof_interval,
        session_signer=signer.address,
    )
    return session_id, signer


def sign(
    world: DevWorld,
    signer: LocalAccount,
    session_id: int,
    input_tokens: int,
    output_tokens: int,
    proof: bytes = PROOF,
) -> bytes:
    """The session signer's receipt for these cumulative input and output tokens."""
    receipt = Receipt(session_id, input_tokens, output_tokens, proof)
    return sign_receipt(signer.key, world.contracts.marketplace.domain(), receipt)
