"""Helpers shared by the contract tests: open sessions and sign receipts."""

from __future__ import annotations

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak

from inferledger.chain.devchain import DevWorld
from inferledger.chain.receipts import Receipt, sign_receipt
from inferledger.chain.tx import TxSender
from inferledger.chain.units import usdc

PRICE = 2_000_000_000  # $0.002 per token, per million tokens in base units
PROOF = keccak(text="proof bundle")
URI = "test://bundle"


def open_session(
    world: DevWorld,
    *,
    user: TxSender | None = None,
    deposit: int = usdc("2"),
    price: int = PRICE,
    proof_interval: int = 100,
    duration: int = 86400,
    signer: LocalAccount | None = None,
) -> tuple[int, LocalAccount]:
    """Approve and create a session with the world's host; returns (id, session signer)."""
    user = user or world.user
    signer = signer or Account.create()
    c = world.contracts
    c.token.approve(user, c.marketplace.address, deposit)
    session_id = c.marketplace.create_session(
        user,
        host=world.host.address,
        model_id=world.model_id,
        deposit=deposit,
        price_per_mtok=price,
        max_duration=duration,
        proof_interval=proof_interval,
        session_signer=signer.address,
    )
    return session_id, signer


def sign(
    world: DevWorld, signer: LocalAccount, session_id: int, tokens: int, proof: bytes = PROOF
) -> bytes:
    """The session signer's receipt for ``tokens`` cumulative tokens."""
    receipt = Receipt(session_id=session_id, tokens=tokens, proof_hash=proof)
    return sign_receipt(signer.key, world.contracts.marketplace.domain(), receipt)
