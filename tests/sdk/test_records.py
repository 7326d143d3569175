"""Session records: truncation to the node's last receipt, and the on-disk store."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from inferledger.sdk import SdkError
from inferledger.sdk.records import (
    RECORD_VERSION,
    ReceiptRecord,
    RecordStore,
    ReplyRecord,
    SessionRecord,
)


def record(session_id: int = 1, chain_id: int = 31337) -> SessionRecord:
    return SessionRecord(
        session_id=session_id,
        chain_id=chain_id,
        chain_url="http://127.0.0.1:8545",
        marketplace="0x" + "Ab" * 20,
        depositor="0x" + "01" * 20,
        host="0x" + "02" * 20,
        model_id="0x" + "03" * 32,
        deposit=2_000_000,
        input_price_per_mtok=500_000_000,
        output_price_per_mtok=2_000_000_000,
        proof_interval=10,
        max_duration=86400,
        signer_key="0x" + "04" * 32,
        node_url="ws://127.0.0.1:1/v1/ws",
        replies=[
            ReplyRecord(
                request_id="r1",
                messages=[],
                first_token=0,
                prompt_tokens=11,
                token_ids=[1, 2, 3],
                finish_reason="stop",
            ),
            ReplyRecord(
                request_id="r2",
                messages=[],
                first_token=3,
                prompt_tokens=12,
                token_ids=[4, 5, 6, 7],
                finish_reason="length",
            ),
            ReplyRecord(request_id="r3", messages=[], first_token=7, token_ids=[8, 9]),
        ],
        receipts=[
            ReceiptRecord(
                input_tokens=i, tokens=t, proof_hash="0x", transcript_hash="0x", signature="0x"
            )
            for i, t in ((11, 3), (23, 7), (36, 9))
        ],
        input_tokens=36,
    )


def test_truncate_keeps_exactly_the_receipted_prefix() -> None:
    r = record()
    r.truncate(5)
    assert r.token_ids() == [1, 2, 3, 4, 5]
    assert [(x.request_id, x.finish_reason) for x in r.replies] == [("r1", "stop"), ("r2", None)]
    assert [x.tokens for x in r.receipts] == [3]
    assert r.signed_counts() == (11, 3)
    whole = record()
    whole.truncate(9)
    assert whole.token_ids() == list(range(1, 10)) and len(whole.receipts) == 3
    assert whole.signed_counts() == (36, 9)
    at_boundary = record()
    at_boundary.truncate(7)
    assert [x.request_id for x in at_boundary.replies] == ["r1", "r2"]
    assert at_boundary.replies[1].finish_reason == "length"


def test_store_writes_private_files_atomically_and_lists_by_chain(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "sessions")
    path = store.save(record(1))
    store.save(record(2))
    store.save(record(3, chain_id=1))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in store.directory.iterdir() if p.name.startswith(".")] == []
    loaded = store.load(31337, "0x" + "ab" * 20, 1)  # addresses match in any case
    assert loaded == record(1).model_copy(update={"created_at": loaded.created_at})
    assert sorted(r.session_id for r in store.list(chain_id=31337)) == [1, 2]
    with pytest.raises(SdkError, match="only the process that opened"):
        store.load(31337, "0x" + "ab" * 20, 42)


def test_the_signer_key_is_written_only_to_the_record_file(tmp_path: Path) -> None:
    r = record()
    key = "0x" + "04" * 32
    assert key not in repr(r) and key not in str(r)  # printed, logged: ******
    assert key not in str(r.model_dump())  # a plain dump keeps it secret too
    assert r.signer_key.get_secret_value() == key
    path = RecordStore(tmp_path).save(r)
    assert json.loads(path.read_text())["signer_key"] == key  # the 0600 file holds it
    assert json.loads(path.read_text())["version"] == RECORD_VERSION == 2
