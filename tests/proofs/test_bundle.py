"""Proof bundles: one canonical encoding, strict decoding, and the host signature."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from eth_account import Account
from eth_utils import keccak

from inferledger.proofs.activation import PROOF_BYTES
from inferledger.proofs.bundle import ProofBundle, prompt_hash

HOST_KEY = "0x" + "11" * 32
HOST = Account.from_key(HOST_KEY).address
MARKETPLACE = "0x5FbDB2315678afecb367f032d93F642f64180aa3"

# Pins the version-1 format: any change to key names, hex/int spelling, ordering or the
# signature scheme changes this hash and so breaks every receipt already signed over it.
GOLDEN_PROOF_HASH = "0xa948daa118f722f49ff0d7e072980a735c354a72f0c18d0b968dd254c579f828"


def make_bundle(**changes: object) -> ProofBundle:
    bundle = ProofBundle(
        session_id=7,
        chain_id=31337,
        marketplace=MARKETPLACE,
        checkpoint_index=2,
        model_id=keccak(b"HuggingFaceTB/SmolLM2-135M-Instruct"),
        token_start=32,
        token_end=64,
        transcript_hash=keccak(b"transcript"),
        prompt_hash=prompt_hash([1, 2, 3]),
        activation_proofs=(bytes(range(256)) + b"\x00\x01", b"\xab" * PROOF_BYTES),
        prover="activation",
        unproven=False,
        backend="transformers",
        dtype="float32",
    )
    return replace(bundle, **changes)


def test_round_trip() -> None:
    bundle = make_bundle().signed(HOST_KEY)
    assert ProofBundle.decode(bundle.encode()) == bundle
    unsigned = make_bundle(activation_proofs=(), prover="commitment", unproven=True)
    assert ProofBundle.decode(unsigned.encode()) == unsigned


def test_encoding_is_compact_sorted_json() -> None:
    data = make_bundle().encode()
    doc = json.loads(data)
    assert list(doc) == sorted(doc)
    assert doc["version"] == 1
    assert doc["token_end"] == 64
    assert doc["host_signature"] == "0x"
    assert doc["activation_proofs"][1] == "0x" + "ab" * PROOF_BYTES
    assert b" " not in data and b"\n" not in data
    assert b"Hello" not in data  # hashes only, never prompt text


def test_golden_proof_hash() -> None:
    bundle = make_bundle().signed(HOST_KEY)
    assert bundle.proof_hash() == keccak(bundle.encode())
    assert "0x" + bundle.proof_hash().hex() == GOLDEN_PROOF_HASH


def test_prompt_hash_is_int64_big_endian() -> None:
    expected = keccak(b"".join(t.to_bytes(8, "big", signed=True) for t in [1, -1, 2**40]))
    assert prompt_hash([1, -1, 2**40]) == expected
    assert prompt_hash([1, 2]) != prompt_hash([2, 1])


def _edit(data: bytes, **changes: object) -> bytes:
    doc = json.loads(data)
    doc.update(changes)
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _without(data: bytes, key: str) -> bytes:
    doc = json.loads(data)
    del doc[key]
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


CANONICAL = make_bundle().signed(HOST_KEY).encode()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(json.dumps(json.loads(CANONICAL), sort_keys=True).encode(), id="whitespace"),
        pytest.param(CANONICAL + b"\n", id="trailing-newline"),
        pytest.param(
            json.dumps(
                dict(reversed(json.loads(CANONICAL).items())), separators=(",", ":")
            ).encode(),
            id="reordered-keys",
        ),
        pytest.param(CANONICAL.replace(b'"0x' + b"ab" * 4, b'"0x' + b"AB" * 4, 1), id="upper-hex"),
        pytest.param(CANONICAL.replace(b'"token_end":64', b'"token_end":64.0'), id="float-int"),
        pytest.param(CANONICAL.replace(b'"session_id":7', b'"session_id":07'), id="leading-zero"),
        pytest.param(_without(CANONICAL, "dtype"), id="missing-field"),
        pytest.param(_without(CANONICAL, "version"), id="missing-version"),
        pytest.param(_edit(CANONICAL, extra=1), id="extra-field"),
        pytest.param(_edit(CANONICAL, version=2), id="future-version"),
        pytest.param(_edit(CANONICAL, model_id="0x" + "00" * 31), id="short-model-id"),
        pytest.param(_edit(CANONICAL, prompt_hash="00" * 32), id="hex-without-0x"),
        pytest.param(_edit(CANONICAL, activation_proofs=["0x" + "00" * 257]), id="short-proof"),
        pytest.param(_edit(CANONICAL, host_signature="0x" + "00" * 64), id="short-signature"),
        pytest.param(_edit(CANONICAL, prover="zk"), id="unknown-prover"),
        pytest.param(_edit(CANONICAL, unproven=1), id="int-as-bool"),
        pytest.param(_edit(CANONICAL, token_start=64), id="empty-range"),
        pytest.param(_edit(CANONICAL, checkpoint_index=0), id="zero-checkpoint"),
        pytest.param(_edit(CANONICAL, session_id=-1), id="negative"),
        pytest.param(_edit(CANONICAL, marketplace=MARKETPLACE.lower()), id="unchecksummed"),
        pytest.param(_edit(CANONICAL, unproven=True), id="unproven-activation"),
        pytest.param(b"[]", id="not-an-object"),
        pytest.param(b"\xff", id="not-utf8"),
    ],
)
def test_decode_rejects(data: bytes) -> None:
    with pytest.raises(ValueError):
        ProofBundle.decode(data)


def test_reencoded_non_canonical_input_names_the_problem() -> None:
    spaced = json.dumps(json.loads(CANONICAL), sort_keys=True).encode()
    with pytest.raises(ValueError, match="not canonical"):
        ProofBundle.decode(spaced)


def test_signature_recovers_the_host() -> None:
    bundle = make_bundle().signed(HOST_KEY)
    assert len(bundle.host_signature) == 65
    assert bundle.host_signer() == HOST
    assert bundle.signing_hash() == keccak(make_bundle().encode())
    assert bundle.proof_hash() != make_bundle().proof_hash()  # the hash covers the signature
    assert ProofBundle.decode(bundle.encode()).host_signer() == HOST


@pytest.mark.parametrize(
    "change",
    [
        {"session_id": 8},
        {"chain_id": 1},
        {"marketplace": HOST},
        {"checkpoint_index": 3},
        {"model_id": b"\x00" * 32},
        {"token_start": 0},
        {"token_end": 65},
        {"transcript_hash": b"\x01" * 32},
        {"prompt_hash": prompt_hash([1, 2])},
        {"activation_proofs": ()},
        {"prover": "mock"},
        {"backend": "scripted"},
        {"dtype": "bfloat16"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_any_field_change_breaks_the_signature(change: dict[str, object]) -> None:
    tampered = replace(make_bundle().signed(HOST_KEY), **change)
    assert tampered.host_signer() != HOST


def test_unsigned_bundle_has_no_signer() -> None:
    with pytest.raises(ValueError, match="not signed"):
        make_bundle().host_signer()


def test_malleated_signature_is_rejected() -> None:
    signature = make_bundle().signed(HOST_KEY).host_signature
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    high_s = (n - int.from_bytes(signature[32:64], "big")).to_bytes(32, "big")
    flipped_v = bytes([55 - signature[64]])
    with pytest.raises(ValueError, match="high s"):
        make_bundle(host_signature=signature[:32] + high_s + flipped_v)
