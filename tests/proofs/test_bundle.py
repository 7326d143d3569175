"""Proof bundles: one canonical encoding, strict decoding, and the host signature."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from eth_account import Account
from eth_utils import keccak

from inferledger.proofs.activation import PROOF_BYTES
from inferledger.proofs.bundle import (
    ProofBundle,
    Segment,
    mask_proof,
    prompt_hash,
    sealed_transcript,
)

HOST_KEY = "0x" + "11" * 32
HOST = Account.from_key(HOST_KEY).address
MARKETPLACE = "0x5FbDB2315678afecb367f032d93F642f64180aa3"

SALT = keccak(b"salt")

# Pins the version-2 format: any change to key names, hex/int spelling, ordering or the
# signature scheme changes this hash and so breaks every receipt already signed over it.
GOLDEN_PROOF_HASH = "0x0e3e892e80e2bf4cb90a33aa8ff14de7e027959ea4e589f9fe6ae784e2eb1216"


PROOF_A = bytes(range(256)) + b"\x00\x01"
PROOF_B = b"\xab" * PROOF_BYTES
PROOF_C = b"\xcd" * PROOF_BYTES


def make_bundle(**changes: object) -> ProofBundle:
    """Checkpoint 2 of a session: the end of one reply, then the start of the next."""
    bundle = ProofBundle(
        session_id=7,
        chain_id=31337,
        marketplace=MARKETPLACE,
        checkpoint_index=2,
        model_id=keccak(b"HuggingFaceTB/SmolLM2-135M-Instruct"),
        token_start=32,
        token_end=64,
        transcript_hash=keccak(b"transcript"),
        segments=(
            Segment(  # reply tokens [20, 40): one decode chunk
                prompt_hash=prompt_hash([1, 2, 3], SALT),
                prompt_tokens=3,
                reply_start=20,
                reply_end=40,
                activation_proofs=(PROOF_A,),
            ),
            Segment(  # a new reply: its prompt chunk, then one decode chunk
                prompt_hash=prompt_hash([4, 5], SALT),
                prompt_tokens=2,
                reply_start=0,
                reply_end=12,
                activation_proofs=(PROOF_B, PROOF_C),
            ),
        ),
        prover="activation",
        unproven=False,
        backend="transformers",
        dtype="float32",
    )
    return replace(bundle, **changes)


def without_proofs(bundle: ProofBundle) -> tuple[Segment, ...]:
    return tuple(replace(segment, activation_proofs=()) for segment in bundle.segments)


def test_round_trip() -> None:
    bundle = make_bundle().signed(HOST_KEY)
    assert ProofBundle.decode(bundle.encode()) == bundle
    bare = without_proofs(bundle)
    unsigned = make_bundle(segments=bare, prover="commitment", unproven=True)
    assert ProofBundle.decode(unsigned.encode()) == unsigned
    external = make_bundle(segments=bare, prover="external", attestation=b"\x01\x02")
    assert ProofBundle.decode(external.signed(HOST_KEY).encode()) == external.signed(HOST_KEY)


def test_encoding_is_compact_sorted_json() -> None:
    data = make_bundle().encode()
    doc = json.loads(data)
    assert list(doc) == sorted(doc)
    assert doc["version"] == 3
    assert doc["token_end"] == 64
    assert doc["host_signature"] == "0x"
    assert doc["attestation"] == "0x"
    assert doc["segments"][1] == {
        "activation_proofs": ["0x" + "ab" * PROOF_BYTES, "0x" + "cd" * PROOF_BYTES],
        "prompt_hash": "0x" + prompt_hash([4, 5], SALT).hex(),
        "prompt_tokens": 2,
        "repetition_penalty": 1.0,
        "reply_end": 12,
        "reply_start": 0,
        "seed_commitment": "0x" + "00" * 32,
        "temperature": 0.0,
        "top_p": 1.0,
    }
    assert list(doc["segments"][0]) == sorted(doc["segments"][0])
    assert b" " not in data and b"\n" not in data
    assert b"Hello" not in data  # hashes only, never prompt text


def test_golden_proof_hash() -> None:
    bundle = make_bundle().signed(HOST_KEY)
    assert bundle.proof_hash() == keccak(bundle.encode())
    assert "0x" + bundle.proof_hash().hex() == GOLDEN_PROOF_HASH


def test_prompt_hash_is_salted_int64_big_endian() -> None:
    ids = b"".join(t.to_bytes(8, "big", signed=True) for t in [1, -1, 2**40])
    assert prompt_hash([1, -1, 2**40], SALT) == keccak(b"inferledger/prompt/v2" + SALT + ids)
    assert prompt_hash([1, 2], SALT) != prompt_hash([2, 1], SALT)
    assert prompt_hash([1, 2], SALT) != prompt_hash([1, 2], keccak(b"another salt"))
    with pytest.raises(ValueError, match="salt must be 32 bytes"):
        prompt_hash([1], b"")


def test_the_transcript_seal_and_the_proof_mask_need_the_salt() -> None:
    chain = keccak(b"chain")
    assert sealed_transcript(chain, SALT) == keccak(b"inferledger/transcript/v2" + SALT + chain)
    masked = mask_proof(PROOF_A, SALT, 2, 0, 0)
    assert len(masked) == len(PROOF_A) and masked != PROOF_A
    assert mask_proof(masked, SALT, 2, 0, 0) == PROOF_A
    # Every place in the session has its own keystream: no two proofs share one.
    places = [(2, 0, 0), (2, 0, 1), (2, 1, 0), (3, 0, 0)]
    assert len({mask_proof(PROOF_B, SALT, *place) for place in places}) == len(places)


def _edit(data: bytes, **changes: object) -> bytes:
    doc = json.loads(data)
    doc.update(changes)
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _edit_segment(data: bytes, index: int, **changes: object) -> bytes:
    doc = json.loads(data)
    doc["segments"][index].update(changes)
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
        pytest.param(_edit(CANONICAL, version=4), id="future-version"),
        pytest.param(_edit(CANONICAL, version=2), id="unsampled-version-2"),
        pytest.param(_edit(CANONICAL, version=1), id="unsalted-version-1"),
        pytest.param(_edit_segment(CANONICAL, 0, temperature=1), id="int-temperature"),
        pytest.param(_edit_segment(CANONICAL, 0, top_p=1.5), id="top-p-above-1"),
        pytest.param(_edit_segment(CANONICAL, 0, repetition_penalty=0.5), id="low-penalty"),
        pytest.param(_edit_segment(CANONICAL, 0, seed_commitment="0x00"), id="short-seed"),
        pytest.param(_edit(CANONICAL, sampler=""), id="empty-sampler"),
        pytest.param(_edit(CANONICAL, model_id="0x" + "00" * 31), id="short-model-id"),
        pytest.param(_edit(CANONICAL, transcript_hash="00" * 32), id="hex-without-0x"),
        pytest.param(
            _edit_segment(CANONICAL, 0, activation_proofs=["0x" + "00" * 257]), id="short-proof"
        ),
        pytest.param(_edit_segment(CANONICAL, 0, activation_proofs=[]), id="missing-proof"),
        pytest.param(_edit_segment(CANONICAL, 0, extra=1), id="segment-extra-field"),
        pytest.param(_edit_segment(CANONICAL, 1, prompt_tokens=0), id="empty-prompt"),
        pytest.param(_edit_segment(CANONICAL, 1, reply_start=1, reply_end=13), id="mid-reply"),
        pytest.param(_edit_segment(CANONICAL, 0, reply_end=41), id="segments-exceed-range"),
        pytest.param(_edit_segment(CANONICAL, 0, reply_start=40), id="empty-segment"),
        pytest.param(_edit(CANONICAL, segments=[]), id="no-segments"),
        pytest.param(_edit(CANONICAL, segments={}), id="segments-not-a-list"),
        pytest.param(_edit(CANONICAL, attestation="0x01"), id="attestation-without-external"),
        pytest.param(_edit(CANONICAL, prover="commitment"), id="commitment-with-proofs"),
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


SEGMENT_0, SEGMENT_1 = make_bundle().segments


@pytest.mark.parametrize(
    "change",
    [
        {"session_id": 8},
        {"chain_id": 1},
        {"marketplace": HOST},
        {"checkpoint_index": 3},
        {"model_id": b"\x00" * 32},
        {"token_start": 0, "token_end": 32},
        {"token_end": 96, "token_start": 64},
        {"transcript_hash": b"\x01" * 32},
        {"segments": (SEGMENT_0, replace(SEGMENT_1, prompt_hash=prompt_hash([4, 6], SALT)))},
        {"segments": (replace(SEGMENT_0, activation_proofs=(PROOF_B,)), SEGMENT_1)},
        {"backend": "scripted"},
        {"dtype": "bfloat16"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_any_field_change_breaks_the_signature(change: dict[str, object]) -> None:
    tampered = replace(make_bundle().signed(HOST_KEY), **change)
    assert tampered.host_signer() != HOST


BARE = without_proofs(make_bundle())


@pytest.mark.parametrize(
    ("base", "change"),
    [
        ({"prover": "commitment"}, {"prover": "mock"}),
        ({"prover": "commitment"}, {"unproven": True}),
        ({"prover": "external", "attestation": b"\x01"}, {"attestation": b"\x02"}),
    ],
    ids=["prover", "unproven", "attestation"],
)
def test_prover_fields_are_signed(base: dict[str, object], change: dict[str, object]) -> None:
    signed = make_bundle(segments=BARE, **base).signed(HOST_KEY)
    assert replace(signed, **change).host_signer() != HOST


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"token_end": 65}, r"segments cover 32 tokens, the range \[32, 65\) has 33"),
        (
            {"segments": (SEGMENT_0, replace(SEGMENT_1, reply_start=1, reply_end=13))},
            "only the first segment may start mid-reply",
        ),
        (
            {"segments": (SEGMENT_0, replace(SEGMENT_1, activation_proofs=(PROOF_B,)))},
            "segment 1 has 1 activation proofs, prover 'activation' needs 2",
        ),
        ({"prover": "mock"}, "segment 0 has 1 activation proofs, prover 'mock' needs 0"),
        ({"attestation": b"\x01"}, "an attestation comes with prover 'external', and only there"),
        ({"segments": ()}, "segments must be a non-empty tuple"),
    ],
    ids=["range", "mid-reply", "proof-count", "mock-with-proofs", "attestation", "empty"],
)
def test_inconsistent_bundles_say_why(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_bundle(**change)


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
