"""The hand-encoded receipt digest, signature and recovery equal eth-account's EIP-712 ones.

The node checks every receipt and the SDK signs every one, so both use a direct encoding
(``receipt_digest``, coincurve); these properties keep it byte for byte the general
encoder's (which ``tests/contracts/test_receipts.py`` checks against the contract).
"""

from __future__ import annotations

import pytest
from eth_account import Account
from hypothesis import given, settings
from hypothesis import strategies as st

from inferledger.chain.keccak import keccak256
from inferledger.chain.receipts import (
    InvalidSignature,
    Receipt,
    ReceiptDomain,
    check_receipt_signature,
    receipt_digest,
    recover_receipt_signer,
    sign_digest,
    sign_receipt,
    typed_receipt_digest,
)
from inferledger.chain.receipts import _message as typed_message
from inferledger.proofs.transcript import TranscriptHash

KEY = Account.from_key(b"\x07" * 32)
counts = st.integers(min_value=0, max_value=2**63 - 1)
domains = st.builds(
    ReceiptDomain,
    st.integers(min_value=1, max_value=2**64),
    st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex()),
)
receipts = st.builds(
    Receipt,
    st.integers(min_value=1, max_value=2**63 - 1),
    counts,
    counts,
    st.binary(min_size=32, max_size=32),
)


@settings(max_examples=50, deadline=None)
@given(domain=domains, receipt=receipts)
def test_digest_signature_and_recovery_equal_eth_accounts(
    domain: ReceiptDomain, receipt: Receipt
) -> None:
    assert receipt_digest(domain, receipt) == typed_receipt_digest(domain, receipt)
    signature = sign_receipt(KEY.key, domain, receipt)
    expected = Account.sign_message(typed_message(domain, receipt), KEY.key).signature
    assert signature == bytes(expected)
    assert sign_receipt("0x" + KEY.key.hex(), domain, receipt) == signature
    assert recover_receipt_signer(domain, receipt, signature) == KEY.address
    check_receipt_signature(domain, receipt, signature, KEY.address)
    check_receipt_signature(domain, receipt, signature, KEY.address.lower())


@settings(max_examples=50, deadline=None)
@given(key=st.binary(min_size=32, max_size=32), digest=st.binary(min_size=32, max_size=32))
def test_a_digest_is_signed_as_eth_account_signs_it(key: bytes, digest: bytes) -> None:
    try:
        expected = bytes(Account.unsafe_sign_hash(digest, key).signature)
    except (ValueError, TypeError):  # not a secp256k1 key (zero, or beyond the order)
        with pytest.raises(ValueError):
            sign_digest(key, digest)
        return
    assert sign_digest(key, digest) == expected
    assert sign_digest("0x" + key.hex(), digest) == expected


def test_a_receipt_signed_for_other_counts_or_by_another_key_is_refused() -> None:
    domain = ReceiptDomain(31337, "0x" + "ab" * 20)
    receipt = Receipt(1, 10, 20, bytes(32))
    signature = sign_receipt(KEY.key, domain, receipt)
    with pytest.raises(InvalidSignature, match="not the session signer"):
        check_receipt_signature(domain, Receipt(1, 10, 21, bytes(32)), signature, KEY.address)
    with pytest.raises(InvalidSignature, match="not the session signer"):
        check_receipt_signature(domain, receipt, signature, Account.create().address)
    with pytest.raises(InvalidSignature):
        check_receipt_signature(domain, receipt, signature[:64] + b"\x1d", KEY.address)


def test_the_transcript_chain_is_keccak256_of_the_previous_link_and_the_token() -> None:
    from eth_utils.crypto import keccak

    transcript = TranscriptHash(5)
    assert transcript.value == keccak(b"inferledger/transcript/v1" + (5).to_bytes(32, "big"))
    before = transcript.value
    assert transcript.update(-3) == keccak(before + (-3).to_bytes(8, "big", signed=True))
    assert keccak256(b"abc") == keccak(b"abc")
