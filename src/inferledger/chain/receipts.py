"""EIP-712 receipts: the user's signature on how many tokens a session has received.

The typed data must match JobMarketplace exactly (name "inferledger", version "1",
the chain id and the marketplace address), so a receipt for another session,
chain or contract never verifies.
"""

from __future__ import annotations

from dataclasses import dataclass

from eth_account import Account
from eth_account.messages import SignableMessage, encode_typed_data
from eth_utils import keccak

DOMAIN_NAME = "inferledger"
DOMAIN_VERSION = "1"
RECEIPT_FIELDS = [
    {"name": "sessionId", "type": "uint256"},
    {"name": "tokens", "type": "uint256"},
    {"name": "proofHash", "type": "bytes32"},
]


@dataclass(frozen=True)
class ReceiptDomain:
    """Binds receipts to one marketplace on one chain."""

    chain_id: int
    marketplace: str


@dataclass(frozen=True)
class Receipt:
    """Cumulative tokens received in a session, and the checkpoint's proof hash."""

    session_id: int
    tokens: int
    proof_hash: bytes

    def __post_init__(self) -> None:
        if len(self.proof_hash) != 32:
            raise ValueError(f"proof_hash must be 32 bytes, got {len(self.proof_hash)}")


def _message(domain: ReceiptDomain, receipt: Receipt) -> SignableMessage:
    return encode_typed_data(
        full_message={
            "types": {
                "EIP712Domain": [
                    {"name": "name", "type": "string"},
                    {"name": "version", "type": "string"},
                    {"name": "chainId", "type": "uint256"},
                    {"name": "verifyingContract", "type": "address"},
                ],
                "Receipt": RECEIPT_FIELDS,
            },
            "primaryType": "Receipt",
            "domain": {
                "name": DOMAIN_NAME,
                "version": DOMAIN_VERSION,
                "chainId": domain.chain_id,
                "verifyingContract": domain.marketplace,
            },
            "message": {
                "sessionId": receipt.session_id,
                "tokens": receipt.tokens,
                "proofHash": receipt.proof_hash,
            },
        }
    )


def receipt_digest(domain: ReceiptDomain, receipt: Receipt) -> bytes:
    """The 32-byte digest that is signed (equals the contract's ``receipt_digest``)."""
    message = _message(domain, receipt)
    return keccak(b"\x19" + message.version + message.header + message.body)


def sign_receipt(private_key: bytes | str, domain: ReceiptDomain, receipt: Receipt) -> bytes:
    """The 65-byte signature (r, s, v) the contract expects."""
    return bytes(Account.sign_message(_message(domain, receipt), private_key).signature)


def recover_receipt_signer(domain: ReceiptDomain, receipt: Receipt, signature: bytes) -> str:
    """The address that signed ``receipt``; compare it with the session signer."""
    return Account.recover_message(_message(domain, receipt), signature=signature)
