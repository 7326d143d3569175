"""A checkpoint's proof bundle and its one canonical byte encoding.

The receipt a user signs carries ``proof_hash = keccak256(encoding)``, so the encoding must be
byte-stable: anyone holding the bundle recomputes the same hash, and a second spelling of the
same content would be a second hash for one checkpoint. :meth:`ProofBundle.decode` therefore
accepts only the exact bytes :meth:`ProofBundle.encode` produces.

Encoding: ASCII JSON (a subset of UTF-8) with sorted keys and no whitespace; bytes are
lowercase ``0x`` hex, integers JSON integers, ``segments`` a list of objects (keys sorted too)
whose ``activation_proofs`` are lists of hex strings, sampling parameters JSON numbers with a
fraction (``0.7``, ``1.0``: Python's shortest round-trip form), and a ``"version": 3`` field.

Bundles are public, so the bundle holds neither the prompts and output nor anything a stranger
could check a guess of them against: the prompt and transcript hashes are salted, and the
activation proofs masked, with the session's secret salt (``chain.receipts.session_salt``),
which only the user holds and may hand to a verifier.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

from eth_account import Account
from eth_utils.address import to_checksum_address

from inferledger.chain.keccak import keccak256
from inferledger.chain.receipts import check_signature_shape, sign_digest
from inferledger.proofs.activation import PROOF_BYTES, segment_chunks

VERSION = 3
"""3: each segment says how its reply was sampled (parameters and a salted seed commitment)
and the bundle names its sampler; 2: salted prompt and transcript hashes and masked
activation proofs (1 had neither)."""
PROVERS = frozenset({"activation", "commitment", "external", "mock"})

_UINT256_MAX = 2**256 - 1
_HEX = re.compile(r"0x(?:[0-9a-f]{2})*")


@dataclass(frozen=True, kw_only=True)
class Segment:
    """The part of one reply a checkpoint covers: reply tokens ``[reply_start, reply_end)``.

    A checkpoint ends every ``proof_interval`` session tokens, wherever a reply is, so only
    the first segment of a bundle may start mid-reply. ``activation_proofs`` follow
    :func:`~inferledger.proofs.activation.segment_chunks` (the bundle checks their count).
    """

    prompt_hash: bytes
    prompt_tokens: int
    reply_start: int
    reply_end: int
    activation_proofs: tuple[bytes, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed_commitment: bytes = bytes(32)
    """``proofs.sampling.seed_commitment`` of the reply's seed (the user holds the seed)."""

    def __post_init__(self) -> None:
        _check_bytes("prompt_hash", self.prompt_hash, 32)
        _check_bytes("seed_commitment", self.seed_commitment, 32)
        for name, low, high in (
            ("temperature", 0.0, 5.0),
            ("top_p", 0.0, 1.0),
            ("repetition_penalty", 1.0, 2.0),
        ):
            value = getattr(self, name)
            if type(value) is not float or not low <= value <= high:
                raise ValueError(f"{name} must be a float in [{low}, {high}], got {value!r}")
        for name in ("prompt_tokens", "reply_start", "reply_end"):
            _check_uint(name, getattr(self, name))
        if self.prompt_tokens < 1:
            raise ValueError("a segment's prompt has at least one token")
        if self.reply_start >= self.reply_end:
            raise ValueError(f"empty segment [{self.reply_start}, {self.reply_end})")
        if not isinstance(self.activation_proofs, tuple):
            raise ValueError("activation_proofs must be a tuple")
        for proof in self.activation_proofs:
            _check_bytes("an activation proof", proof, PROOF_BYTES)

    @property
    def tokens(self) -> int:
        """Reply tokens this segment covers."""
        return self.reply_end - self.reply_start

    def chunk_count(self) -> int:
        """How many activation proofs an ``activation`` bundle carries for this segment."""
        return len(segment_chunks(self.prompt_tokens, self.reply_start, self.reply_end))


@dataclass(frozen=True, kw_only=True)
class ProofBundle:
    """What a host attests for one checkpoint of a session (format ``VERSION``).

    ``[token_start, token_end)`` are the session tokens this checkpoint covers, split over
    ``segments`` (one per reply touched, in order); ``token_end`` is the cumulative count the
    receipt pays for and ``transcript_hash`` the hash chain after it. ``unproven`` marks a
    commitment fallback after a prover failed, so it requires ``prover == "commitment"``.
    ``attestation`` is an external prover's output (only there). ``host_signature`` is ``b""``
    until :meth:`signed`.
    """

    session_id: int
    chain_id: int
    marketplace: str
    checkpoint_index: int
    model_id: bytes
    token_start: int
    token_end: int
    transcript_hash: bytes
    segments: tuple[Segment, ...]
    prover: str
    unproven: bool
    backend: str
    dtype: str
    sampler: str = "none"
    """The sampler that chose the tokens (``inference.sampling.SAMPLER``), or ``none``: a
    verifier checks the choice only for a sampler it knows."""
    attestation: bytes = b""
    host_signature: bytes = b""

    def __post_init__(self) -> None:
        for name in ("session_id", "chain_id", "checkpoint_index", "token_start", "token_end"):
            _check_uint(name, getattr(self, name))
        if self.checkpoint_index < 1:
            raise ValueError("checkpoint_index is 1-based")
        if self.token_start >= self.token_end:
            raise ValueError(f"empty token range [{self.token_start}, {self.token_end})")
        if not isinstance(self.marketplace, str) or not _is_checksummed(self.marketplace):
            raise ValueError(f"marketplace must be a checksummed address, got {self.marketplace!r}")
        for name in ("model_id", "transcript_hash"):
            _check_bytes(name, getattr(self, name), 32)
        if not isinstance(self.prover, str) or self.prover not in PROVERS:
            raise ValueError(f"unknown prover {self.prover!r}")
        if type(self.unproven) is not bool:
            raise ValueError("unproven must be a bool")
        if self.unproven and self.prover != "commitment":
            raise ValueError("an unproven bundle is a commitment fallback")
        for name in ("backend", "dtype", "sampler"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string")
        self._check_segments()
        if not isinstance(self.attestation, bytes):
            raise ValueError("attestation must be bytes")
        if bool(self.attestation) != (self.prover == "external"):
            raise ValueError("an attestation comes with prover 'external', and only there")
        if self.host_signature != b"":
            _check_signature(self.host_signature)

    def _check_segments(self) -> None:
        segments = self.segments
        if not isinstance(segments, tuple) or not segments:
            raise ValueError("segments must be a non-empty tuple")
        if not all(isinstance(segment, Segment) for segment in segments):
            raise ValueError("segments must hold Segment objects")
        covered = sum(segment.tokens for segment in segments)
        if covered != self.token_end - self.token_start:
            raise ValueError(
                f"segments cover {covered} tokens, the range [{self.token_start}, "
                f"{self.token_end}) has {self.token_end - self.token_start}"
            )
        if any(segment.reply_start for segment in segments[1:]):
            raise ValueError("only the first segment may start mid-reply")
        for index, segment in enumerate(segments):
            expected = segment.chunk_count() if self.prover == "activation" else 0
            if len(segment.activation_proofs) != expected:
                raise ValueError(
                    f"segment {index} has {len(segment.activation_proofs)} activation proofs, "
                    f"prover {self.prover!r} needs {expected}"
                )

    def encode(self) -> bytes:
        """The canonical bytes; ``proof_hash`` is their keccak256."""
        doc = {"version": VERSION, **_jsonable(self)}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> ProofBundle:
        """Parse and validate ``data``; anything but the canonical encoding is a ValueError."""
        doc = _object(json.loads(data), cls, "a proof bundle", extra=frozenset({"version"}))
        version = doc.pop("version")
        if type(version) is not int or version != VERSION:
            raise ValueError(f"unsupported bundle version {version!r}")
        for name in ("model_id", "transcript_hash", "attestation", "host_signature"):
            doc[name] = _from_hex(name, doc[name])
        if not isinstance(doc["segments"], list):
            raise ValueError("segments must be a list")
        doc["segments"] = tuple(_decode_segment(item) for item in doc["segments"])
        bundle = cls(**doc)
        if bundle.encode() != data:
            raise ValueError("not canonical: re-encoding the bundle gives different bytes")
        return bundle

    def signing_hash(self) -> bytes:
        """What the host signs: keccak256 of the encoding with ``host_signature`` emptied."""
        return keccak256(replace(self, host_signature=b"").encode())

    def signed(self, private_key: bytes | str) -> ProofBundle:
        """A copy carrying the host's 65-byte signature over :meth:`signing_hash`."""
        return replace(self, host_signature=sign_digest(private_key, self.signing_hash()))

    def host_signer(self) -> str:
        """The address that signed the bundle; compare it with the session's host."""
        if not self.host_signature:
            raise ValueError("the bundle is not signed")
        return str(Account._recover_hash(self.signing_hash(), signature=self.host_signature))

    def proof_hash(self) -> bytes:
        """keccak256 of the full encoding, signature included: what receipts commit to."""
        return keccak256(self.encode())


def prompt_hash(token_ids: Iterable[int], salt: bytes) -> bytes:
    """Salted keccak256 over the prompt's token ids as int64 big-endian (as in the
    transcript): without the salt, hashing a guessed prompt confirms nothing."""
    return _salted(b"prompt", salt, b"".join(t.to_bytes(8, "big", signed=True) for t in token_ids))


def sealed_transcript(transcript_hash: bytes, salt: bytes) -> bytes:
    """The bundle's ``transcript_hash``: the session's hash chain (docs/protocol.md) salted,
    since anyone can run the chain over guessed output from the public session id."""
    return _salted(b"transcript", salt, transcript_hash)


def mask_proof(proof: bytes, salt: bytes, checkpoint: int, segment: int, chunk: int) -> bytes:
    """XOR ``proof`` with a keystream of the salt and its place in the session (each place
    once, so no two proofs share a stream); applying it twice gives the proof back. An
    unmasked activation proof would let a stranger with the model test guessed prompts."""
    place = b"".join(n.to_bytes(32, "big") for n in (checkpoint, segment, chunk))
    stream = b"".join(
        _salted(b"proof-mask", salt, place + block.to_bytes(32, "big"))
        for block in range(-(-len(proof) // 32))
    )
    return bytes(a ^ b for a, b in zip(proof, stream, strict=False))


def _salted(purpose: bytes, salt: bytes, data: bytes) -> bytes:
    _check_bytes("salt", salt, 32)
    return keccak256(b"inferledger/" + purpose + b"/v2" + salt + data)


@functools.lru_cache(maxsize=256)  # a node's bundles name one host: checked once, not each time
def _is_checksummed(address: str) -> bool:
    try:
        return to_checksum_address(address) == address
    except ValueError:
        return False


def _check_uint(name: str, value: object) -> None:
    if type(value) is not int or not 0 <= value <= _UINT256_MAX:
        raise ValueError(f"{name} must be a uint256, got {value!r}")


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


def _jsonable(value: Any) -> Any:
    """A bundle's fields as JSON values: dataclasses become objects (as ``asdict`` makes
    them, without its deep copies of every token id), bytes ``0x`` hex, tuples lists."""
    if type(value) is int or type(value) is str:
        return value
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, bytes):
        return "0x" + value.hex()
    if isinstance(value, tuple | list):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    return value


def _object(
    doc: object, cls: type, what: str, extra: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """``doc`` as a dict holding exactly the fields of ``cls`` (plus ``extra``)."""
    if not isinstance(doc, dict):
        raise ValueError(f"{what} is a JSON object")
    expected = {f.name for f in fields(cls)} | extra
    if doc.keys() != expected:
        missing, unexpected = sorted(expected - doc.keys()), sorted(doc.keys() - expected)
        raise ValueError(f"{what} fields differ: missing {missing}, unexpected {unexpected}")
    return dict(doc)


def _decode_segment(item: object) -> Segment:
    doc = _object(item, Segment, "a segment")
    for name in ("prompt_hash", "seed_commitment"):
        doc[name] = _from_hex(name, doc[name])
    proofs = doc["activation_proofs"]
    if not isinstance(proofs, list):
        raise ValueError("activation_proofs must be a list")
    doc["activation_proofs"] = tuple(_from_hex("an activation proof", p) for p in proofs)
    return Segment(**doc)
