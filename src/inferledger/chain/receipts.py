"""EIP-712 messages a session signer signs: receipts and session logins.

The domain must match JobMarketplace exactly (name "inferledger", version "1",
the chain id and the marketplace address), so a receipt for another session,
chain or contract never verifies. ``SessionAuth`` is the node's login challenge:
signed under the same domain, bound to the node's address and a fresh nonce. ``SessionRead``
signs a request for the node's record of a session (``GET /v1/sessions/{id}``), bound to the
node and a timestamp. ``HostChallenge`` is the one the host signs: each connection's nonce and
ephemeral channel key, so a client knows it reached the host named on chain before it sends
anything (docs/protocol.md, "Encryption"). ``SessionSalt`` is never sent: the hash of its
signature is the session's secret salt for proof bundles (docs/proofs.md, "Privacy").
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import coincurve
from eth_account import Account
from eth_account.messages import SignableMessage, encode_typed_data
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from inferledger.chain.keccak import keccak256

DOMAIN_NAME = "inferledger"
DOMAIN_VERSION = "1"
RECEIPT_FIELDS = [
    {"name": "sessionId", "type": "uint256"},
    {"name": "inputTokens", "type": "uint256"},
    {"name": "outputTokens", "type": "uint256"},
    {"name": "proofHash", "type": "bytes32"},
]
SESSION_AUTH_FIELDS = [
    {"name": "sessionId", "type": "uint256"},
    {"name": "nonce", "type": "bytes32"},
    {"name": "host", "type": "address"},
]
SESSION_READ_FIELDS = [
    {"name": "sessionId", "type": "uint256"},
    {"name": "timestamp", "type": "uint256"},
    {"name": "host", "type": "address"},
]
READ_TIMESTAMP_HEADER = "X-Inferledger-Timestamp"
READ_SIGNATURE_HEADER = "X-Inferledger-Signature"
"""The headers of a signed ``GET /v1/sessions/{id}``: unix seconds and a ``SessionRead``
signature over (session id, those seconds, the node's address)."""
SESSION_SALT_FIELDS = [{"name": "sessionId", "type": "uint256"}]
VERDICT_FIELDS = [
    {"name": "disputeId", "type": "uint256"},
    {"name": "fraud", "type": "bool"},
]
HOST_CHALLENGE_FIELDS = [
    {"name": "nonce", "type": "bytes32"},
    {"name": "nodeKey", "type": "bytes32"},
]


@dataclass(frozen=True)
class ReceiptDomain:
    """Binds receipts to one marketplace on one chain."""

    chain_id: int
    marketplace: str


@dataclass(frozen=True)
class Receipt:
    """Cumulative prompt (input) and completion (output) tokens of a session, and the
    checkpoint's proof hash."""

    session_id: int
    input_tokens: int
    output_tokens: int
    proof_hash: bytes

    def __post_init__(self) -> None:
        if self.input_tokens < 0 or self.output_tokens < 0:
            raise ValueError(
                f"token counts must be non-negative, got {self.input_tokens} input and "
                f"{self.output_tokens} output"
            )
        if len(self.proof_hash) != 32:
            raise ValueError(f"proof_hash must be 32 bytes, got {len(self.proof_hash)}")


@dataclass(frozen=True)
class SessionAuth:
    """A session signer's answer to a node's login challenge."""

    session_id: int
    nonce: bytes
    host: str

    def __post_init__(self) -> None:
        if len(self.nonce) != 32:
            raise ValueError(f"nonce must be 32 bytes, got {len(self.nonce)}")


def _typed(
    domain: ReceiptDomain, primary: str, fields: list[dict[str, str]], message: dict[str, object]
) -> SignableMessage:
    return encode_typed_data(
        full_message={
            "types": {
                "EIP712Domain": [
                    {"name": "name", "type": "string"},
                    {"name": "version", "type": "string"},
                    {"name": "chainId", "type": "uint256"},
                    {"name": "verifyingContract", "type": "address"},
                ],
                primary: fields,
            },
            "primaryType": primary,
            "domain": {
                "name": DOMAIN_NAME,
                "version": DOMAIN_VERSION,
                "chainId": domain.chain_id,
                "verifyingContract": domain.marketplace,
            },
            "message": message,
        }
    )


def _message(domain: ReceiptDomain, receipt: Receipt) -> SignableMessage:
    return _typed(
        domain,
        "Receipt",
        RECEIPT_FIELDS,
        {
            "sessionId": receipt.session_id,
            "inputTokens": receipt.input_tokens,
            "outputTokens": receipt.output_tokens,
            "proofHash": receipt.proof_hash,
        },
    )


def _auth_message(domain: ReceiptDomain, auth: SessionAuth) -> SignableMessage:
    return _typed(
        domain,
        "SessionAuth",
        SESSION_AUTH_FIELDS,
        {"sessionId": auth.session_id, "nonce": auth.nonce, "host": auth.host},
    )


def sign_session_auth(private_key: bytes | str, domain: ReceiptDomain, auth: SessionAuth) -> bytes:
    """The session signer's 65-byte answer to a node's challenge."""
    return bytes(Account.sign_message(_auth_message(domain, auth), private_key).signature)


def recover_session_auth_signer(domain: ReceiptDomain, auth: SessionAuth, signature: bytes) -> str:
    """Who signed a login; the node compares it with the session's signer on chain."""
    return str(Account.recover_message(_auth_message(domain, auth), signature=signature))


def _host_challenge(domain: ReceiptDomain, nonce: bytes, node_key: bytes) -> SignableMessage:
    message: dict[str, object] = {"nonce": nonce, "nodeKey": node_key}
    return _typed(domain, "HostChallenge", HOST_CHALLENGE_FIELDS, message)


def sign_host_challenge(
    private_key: bytes | str, domain: ReceiptDomain, nonce: bytes, node_key: bytes
) -> bytes:
    """The host's 65-byte signature on a connection's challenge nonce and channel key."""
    message = _host_challenge(domain, nonce, node_key)
    return bytes(Account.sign_message(message, private_key).signature)


def recover_host_challenge_signer(
    domain: ReceiptDomain, nonce: bytes, node_key: bytes, signature: bytes
) -> str:
    """Who signed a challenge; the client compares it with the session's host on chain."""
    message = _host_challenge(domain, nonce, node_key)
    return str(Account.recover_message(message, signature=signature))


def _verdict(domain: ReceiptDomain, dispute_id: int, fraud: bool) -> SignableMessage:
    return _typed(domain, "Verdict", VERDICT_FIELDS, {"disputeId": dispute_id, "fraud": fraud})


def verdict_digest(domain: ReceiptDomain, dispute_id: int, fraud: bool) -> bytes:
    """The EIP-712 digest of a juror's verdict; ``domain`` names the DisputeManager."""
    message = _verdict(domain, dispute_id, fraud)
    return keccak(b"\x19" + message.version + message.header + message.body)


def sign_verdict(
    private_key: bytes | str, domain: ReceiptDomain, dispute_id: int, fraud: bool
) -> bytes:
    """A juror's 65-byte signature on its verdict, which anyone may relay."""
    message = _verdict(domain, dispute_id, fraud)
    return bytes(Account.sign_message(message, private_key).signature)


def _read_message(
    domain: ReceiptDomain, session_id: int, timestamp: int, host: str
) -> SignableMessage:
    message = {"sessionId": session_id, "timestamp": timestamp, "host": host}
    return _typed(domain, "SessionRead", SESSION_READ_FIELDS, message)


def sign_session_read(
    private_key: bytes | str, domain: ReceiptDomain, session_id: int, timestamp: int, host: str
) -> bytes:
    """The session signer's 65-byte signature on a request to ``host`` for its record."""
    message = _read_message(domain, session_id, timestamp, host)
    return bytes(Account.sign_message(message, private_key).signature)


def recover_session_read_signer(
    domain: ReceiptDomain, session_id: int, timestamp: int, host: str, signature: bytes
) -> str:
    """Who signed a read request; the node compares it with the session's signer."""
    message = _read_message(domain, session_id, timestamp, host)
    return str(Account.recover_message(message, signature=signature))


def session_salt(private_key: bytes | str, domain: ReceiptDomain, session_id: int) -> bytes:
    """The session's 32-byte bundle salt: keccak256 of the signer's ``SessionSalt`` signature.

    Derived, not drawn: the same key gives the same salt on every device and after a
    restart (RFC 6979 signatures are deterministic), so there is nothing new to store, and
    nobody without the key can compute it. No node ever asks for this signature.
    """
    message = _typed(domain, "SessionSalt", SESSION_SALT_FIELDS, {"sessionId": session_id})
    return keccak(Account.sign_message(message, private_key).signature)


_DOMAIN_TYPEHASH = keccak(
    b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
_RECEIPT_TYPEHASH = keccak(
    b"Receipt(uint256 sessionId,uint256 inputTokens,uint256 outputTokens,bytes32 proofHash)"
)


@functools.lru_cache(maxsize=64)
def _domain_separator(domain: ReceiptDomain) -> bytes:
    """EIP-712's domain separator for ``domain``, computed once per domain."""
    marketplace = bytes.fromhex(domain.marketplace.removeprefix("0x").removeprefix("0X"))
    if len(marketplace) != 20:
        raise ValueError(f"marketplace must be a 20-byte address, got {domain.marketplace!r}")
    return keccak(
        _DOMAIN_TYPEHASH
        + keccak(DOMAIN_NAME.encode())
        + keccak(DOMAIN_VERSION.encode())
        + domain.chain_id.to_bytes(32, "big")
        + bytes(12)
        + marketplace
    )


def receipt_digest(domain: ReceiptDomain, receipt: Receipt) -> bytes:
    """The 32-byte digest that is signed (equals the contract's ``receipt_digest``).

    Encoded by hand (``keccak(0x1901 || domain separator || struct hash)``), as it is
    computed for every receipt on both sides; a test keeps it equal to eth-account's
    EIP-712 encoding of the same message."""
    struct = keccak256(
        _RECEIPT_TYPEHASH
        + receipt.session_id.to_bytes(32, "big")
        + receipt.input_tokens.to_bytes(32, "big")
        + receipt.output_tokens.to_bytes(32, "big")
        + receipt.proof_hash
    )
    return keccak256(b"\x19\x01" + _domain_separator(domain) + struct)


def typed_receipt_digest(domain: ReceiptDomain, receipt: Receipt) -> bytes:
    """``receipt_digest`` by eth-account's general EIP-712 encoder (the reference)."""
    message = _message(domain, receipt)
    return keccak(b"\x19" + message.version + message.header + message.body)


def sign_receipt(private_key: bytes | str, domain: ReceiptDomain, receipt: Receipt) -> bytes:
    """The 65-byte signature the contract expects (``sign_digest`` of the receipt's
    digest), byte for byte eth-account's ``sign_message`` of the typed data."""
    return sign_digest(private_key, receipt_digest(domain, receipt))


def sign_digest(private_key: bytes | str, digest: bytes) -> bytes:
    """The 65-byte signature (r, s, v) of a 32-byte digest: v 27 or 28, low s, RFC 6979
    (libsecp256k1's), as eth-account's ``unsafe_sign_hash`` gives it, without its per-call
    key parsing and public-key derivation (a node signs a bundle per checkpoint)."""
    if isinstance(private_key, str):
        private_key = bytes.fromhex(private_key.removeprefix("0x"))
    signed = coincurve.PrivateKey(bytes(private_key)).sign_recoverable(digest, hasher=None)
    return signed[:64] + bytes([signed[64] + 27])


def recover_receipt_signer(domain: ReceiptDomain, receipt: Receipt, signature: bytes) -> str:
    """The address that signed ``receipt``; compare it with the session signer."""
    return str(Account.recover_message(_message(domain, receipt), signature=signature))


def _recover_digest_signer(digest: bytes, signature: bytes) -> bytes:
    """The 20-byte address whose key made ``signature`` (v 27/28) over ``digest``."""
    recoverable = signature[:64] + bytes([signature[64] - 27])
    public = coincurve.PublicKey.from_signature_and_message(recoverable, digest, hasher=None)
    return keccak256(public.format(compressed=False)[1:])[12:]


_SECP256K1_HALF_N = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0


class InvalidSignature(ValueError):
    """A signature the marketplace contract would reject."""


def check_signature_shape(signature: bytes, what: str) -> None:
    """65 bytes, v 27/28 and a low s, as JobMarketplace requires: no malleable twins."""
    if len(signature) != 65:
        raise InvalidSignature(f"{what} must be 65 bytes, got {len(signature)}")
    if signature[64] not in (27, 28):
        raise InvalidSignature(f"{what} v must be 27 or 28")
    if int.from_bytes(signature[32:64], "big") > _SECP256K1_HALF_N:
        raise InvalidSignature(f"{what} has a high s (malleable)")


def check_receipt_signature(
    domain: ReceiptDomain, receipt: Receipt, signature: bytes, signer: str
) -> None:
    """Accept ``signature`` only if JobMarketplace would: 65 bytes, v 27/28, low s, signer."""
    check_signature_shape(signature, "receipt signature")
    try:
        recovered = _recover_digest_signer(receipt_digest(domain, receipt), signature)
    except Exception as exc:
        raise InvalidSignature(f"receipt signature does not recover: {exc}") from exc
    if "0x" + recovered.hex() != signer.lower():
        raise InvalidSignature(
            f"receipt signed by {to_checksum_address(recovered)}, not the session signer {signer}"
        )
