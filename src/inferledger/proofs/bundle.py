"""A checkpoint's proof bundle and its one canonical byte encoding.

The receipt a user signs carries ``proof_hash = keccak256(encoding)``, so the encoding must be
byte-stable: anyone holding the bundle recomputes the same hash, and a second spelling of the
same content would be a second hash for one checkpoint. :meth:`ProofBundle.decode` therefore
accepts only the exact bytes :meth:`ProofBundle.encode` produces.

Encoding: ASCII JSON (a subset of UTF-8) with sorted keys and no whitespace; bytes are
lowercase ``0x`` hex, integers JSON integers, ``activation_proofs`` a list of hex strings, and a
``"version": 1`` field. The bundle holds hashes of the prompt and output, never their text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from eth_account import Account
from eth_utils import keccak, to_checksum_address

from inferledger.chain.receipts import check_signature_shape
from inferledger.proofs.activation import PROOF_BYTES

VERSION = 1
PROVERS = frozenset({"activation", "commitment", "external", "mock"})

_UINT256_MAX = 2**256 - 1
_HEX = re.compile(r"0x(?:[0-9a-f]{2})*")
_INT_FIELDS = ("session_id", "chain_id", "checkpoint_index", "token_start", "token_end")
_HASH_FIELDS = ("model_id", "transcript_hash", "prompt_hash")


@dataclass(frozen=True, kw_only=True)
class ProofBundle:
    """What a host attests for one checkpoint of a session (format version 1).

    ``[token_start, token_end)`` are the tokens this checkpoint covers; ``token_end`` is the
    cumulative count the receipt pays for and ``transcript_hash`` the hash chain after it. The
    range must be non-empty (``token_start < token_end``): a checkpoint with no new tokens has
    nothing to attest. ``unproven`` marks a commitment fallback after a prover failed, so it
    requires ``prover == "commitment"``. ``host_signature`` is ``b""`` until :meth:`signed`.
    """

    session_id: int
    chain_id: int
    marketplace: str
    checkpoint_index: int
    model_id: bytes
    token_start: int
    token_end: int
    transcript_hash: bytes
    prompt_hash: bytes
    activation_proofs: tuple[bytes, ...]
    prover: str
    unproven: bool
    backend: str
    dtype: str
    host_signature: bytes = b""

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= _UINT256_MAX:
                raise ValueError(f"{name} must be a uint256, got {value!r}")
        if self.checkpoint_index < 1:
            raise ValueError("checkpoint_index is 1-based")
        if self.token_start >= self.token_end:
            raise ValueError(f"empty token range [{self.token_start}, {self.token_end})")
        if not isinstance(self.marketplace, str) or not _is_checksummed(self.marketplace):
            raise ValueError(f"marketplace must be a checksummed address, got {self.marketplace!r}")
        for name in _HASH_FIELDS:
            _check_bytes(name, getattr(self, name), 32)
        if not isinstance(self.activation_proofs, tuple):
            raise ValueError("activation_proofs must be a tuple")
        for proof in self.activation_proofs:
            _check_bytes("an activation proof", proof, PROOF_BYTES)
        if not isinstance(self.prover, str) or self.prover not in PROVERS:
            raise ValueError(f"unknown prover {self.prover!r}")
        if type(self.unproven) is not bool:
            raise ValueError("unproven must be a bool")
        if self.unproven and self.prover != "commitment":
            raise ValueError("an unproven bundle is a commitment fallback")
        for name in ("backend", "dtype"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string")
        if self.host_signature != b"":
            _check_signature(self.host_signature)

    def encode(self) -> bytes:
        """The canonical bytes; ``proof_hash`` is their keccak256."""
        doc: dict[str, Any] = {"version": VERSION}
        for name, value in asdict(self).items():
            if isinstance(value, bytes):
                value = "0x" + value.hex()
            elif name == "activation_proofs":
                value = ["0x" + proof.hex() for proof in value]
            doc[name] = value
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> ProofBundle:
        """Parse and validate ``data``; anything but the canonical encoding is a ValueError."""
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("a proof bundle is a JSON object")
        expected = {f.name for f in fields(cls)} | {"version"}
        if doc.keys() != expected:
            missing = sorted(expected - doc.keys())
            extra = sorted(doc.keys() - expected)
            raise ValueError(f"bundle fields differ: missing {missing}, unexpected {extra}")
        version = doc.pop("version")
        if type(version) is not int or version != VERSION:
            raise ValueError(f"unsupported bundle version {version!r}")
        for name in (*_HASH_FIELDS, "host_signature"):
            doc[name] = _from_hex(name, doc[name])
        proofs = doc["activation_proofs"]
        if not isinstance(proofs, list):
            raise ValueError("activation_proofs must be a list")
        doc["activation_proofs"] = tuple(_from_hex("an activation proof", p) for p in proofs)
        bundle = cls(**doc)
        if bundle.encode() != data:
            raise ValueError("not canonical: re-encoding the bundle gives different bytes")
        return bundle

    def signing_hash(self) -> bytes:
        """What the host signs: keccak256 of the encoding with ``host_signature`` emptied."""
        return keccak(replace(self, host_signature=b"").encode())

    def signed(self, private_key: bytes | str) -> ProofBundle:
        """A copy carrying the host's 65-byte signature over :meth:`signing_hash`."""
        signature = Account.unsafe_sign_hash(self.signing_hash(), private_key).signature
        return replace(self, host_signature=bytes(signature))

    def host_signer(self) -> str:
        """The address that signed the bundle; compare it with the session's host."""
        if not self.host_signature:
            raise ValueError("the bundle is not signed")
        return Account._recover_hash(self.signing_hash(), signature=self.host_signature)

    def proof_hash(self) -> bytes:
        """keccak256 of the full encoding, signature included: what receipts commit to."""
        return keccak(self.encode())


def prompt_hash(token_ids: Iterable[int]) -> bytes:
    """keccak256 over the prompt's token ids as int64 big-endian (as in the transcript)."""
    return keccak(b"".join(t.to_bytes(8, "big", signed=True) for t in token_ids))


def _is_checksummed(address: str) -> bool:
    try:
        return to_checksum_address(address) == address
    except ValueError:
        return False


def _check_bytes(name: str, value: object, size: int) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        got = len(value) if isinstance(value, bytes) else type(value).__name__
        raise ValueError(f"{name} must be {size} bytes, got {got}")


def _check_signature(signature: bytes) -> None:
    """A malleated signature would give a second proof_hash for one checkpoint."""
    _check_bytes("host_signature", signature, 65)
    check_signature_shape(signature, "host_signature")


def _from_hex(name: str, value: object) -> bytes:
    if not isinstance(value, str) or not _HEX.fullmatch(value):
        raise ValueError(f"{name} must be lowercase 0x hex")
    return bytes.fromhex(value[2:])
