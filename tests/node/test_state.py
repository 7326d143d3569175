"""NodeState: what the node writes survives a restart, threads and out-of-order receipts."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from inferledger.node.metering import Counts, SentToken
from inferledger.node.state import (
    _MIGRATIONS,
    SCHEMA_VERSION,
    HostedSession,
    NodeState,
    StateError,
    UnknownSession,
)

MODEL_ID = bytes.fromhex("ab" * 32)
PROOF = bytes.fromhex("cd" * 32)
SIG = bytes(range(65))
BIG_DEPOSIT = 10**30  # beyond int64: amounts are uint256 on chain


def tail(first: int, last: int) -> list[SentToken]:
    """Reply tokens ``first``..``last`` (1-based indices), as a connection sent them."""
    return [SentToken(i, 1000 + i, f"t{i}") for i in range(first, last + 1)]


def session(session_id: int = 1, **changes: object) -> HostedSession:
    fields: dict[str, object] = {
        "session_id": session_id,
        "depositor": "0x" + "11" * 20,
        "signer": "0x" + "22" * 20,
        "model_id": MODEL_ID,
        "deposit": 2_000_000,
        "input_price_per_mtok": 500_000_000,
        "output_price_per_mtok": 2_000_000_000,
        "proof_interval": 100,
        "expires_at": 1_900_000_000,
    }
    fields.update(changes)
    return HostedSession(**fields)  # type: ignore[arg-type]


@pytest.fixture
def state(tmp_path: Path) -> Iterator[NodeState]:
    with NodeState(tmp_path / "node.sqlite3") as opened:
        yield opened


def test_session_round_trip(state: NodeState) -> None:
    stored = state.upsert_session(session(7, deposit=BIG_DEPOSIT))
    assert stored.created_at > 0 and stored.status == "open"
    got = state.get_session(7)
    assert got == stored
    assert got.model_id == MODEL_ID and got.deposit == BIG_DEPOSIT
    assert (got.input_price_per_mtok, got.output_price_per_mtok) == (500_000_000, 2_000_000_000)
    assert got.served == Counts(0, 0) and got.receipted == Counts(0, 0)
    assert got.served_tail == () and got.abandoned == 0 and got.last_proof_hash is None
    assert state.get_session(8) is None

    state.record_served(7, Counts(12, 40), tail(1, 40), 0)
    state.record_served(7, Counts(30, 100), tail(1, 100), 2)
    served = state.get_session(7)
    assert served.served == Counts(30, 100) and served.tokens_generated == 100
    assert served.served_tail == tuple(tail(1, 100)) and served.abandoned == 2
    assert served.receipted == Counts(0, 0)
    state.set_status(7, "ended")
    state.upsert_session(session(9))
    assert [s.session_id for s in state.list_sessions()] == [7, 9]
    assert [s.session_id for s in state.list_sessions("ended")] == [7]
    assert [s.session_id for s in state.list_sessions("open")] == [9]


def test_upsert_keeps_counters_and_status_of_an_existing_session(state: NodeState) -> None:
    first = state.upsert_session(session(1))
    state.record_served(1, Counts(30, 150), tail(1, 150), 1)
    state.store_receipt(1, Counts(30, 100), PROOF, SIG)
    state.set_status(1, "ended")

    again = state.upsert_session(session(1, tokens_generated=0, expires_at=1_900_000_500))
    assert again.served == Counts(30, 150)
    assert again.receipted == Counts(30, 100) and again.last_proof_hash == PROOF
    assert again.served_tail == tuple(tail(101, 150))  # the receipt covers the rest
    assert again.abandoned == 1
    assert again.status == "ended"
    assert again.created_at == first.created_at
    assert again.expires_at == 1_900_000_500


def test_requests_round_trip(state: NodeState) -> None:
    state.upsert_session(session(1))
    first = state.start_request(1, "req-a", prompt_tokens=12)
    second = state.start_request(1, "req-b", prompt_tokens=30)
    state.finish_request(first, 64, "stop")
    rows = state.list_requests(1)
    assert [(r.id, r.request_id, r.prompt_tokens) for r in rows] == [
        (first, "req-a", 12),
        (second, "req-b", 30),
    ]
    assert rows[0].completion_tokens == 64 and rows[0].finish_reason == "stop"
    assert rows[0].finished_at is not None and rows[0].finished_at >= rows[0].started_at
    assert rows[1].finish_reason is None and rows[1].finished_at is None
    with pytest.raises(KeyError):
        state.finish_request(second + 100, 1, "stop")


def test_unknown_sessions_and_statuses_are_refused(state: NodeState) -> None:
    with pytest.raises(UnknownSession):
        state.record_served(5, Counts(1, 1), tail(1, 1), 0)
    with pytest.raises(UnknownSession):
        state.set_status(5, "ended")
    with pytest.raises(UnknownSession):
        state.start_request(5, "r", 1)
    with pytest.raises(UnknownSession):
        state.store_receipt(5, Counts(1, 1), PROOF, SIG)
    state.upsert_session(session(5))
    with pytest.raises(ValueError, match="unknown session status 'done'"):
        state.set_status(5, "done")  # type: ignore[arg-type]
    assert state.get_session(5).status == "open"


def test_receipts_only_move_forward(state: NodeState) -> None:
    state.upsert_session(session(1))
    state.store_receipt(1, Counts(20, 100), PROOF, SIG)
    later_proof = bytes.fromhex("ee" * 32)
    state.store_receipt(1, Counts(20, 200), later_proof, SIG[::-1])

    # Equal, older, or lower in either count (more output but less input) are all refused.
    for stale in (Counts(20, 200), Counts(20, 150), Counts(0, 0), Counts(10, 300)):
        with pytest.raises(ValueError, match=r"already has a receipt for 20/200"):
            state.store_receipt(1, stale, PROOF, SIG)

    latest = state.latest_receipt(1)
    assert latest is not None
    assert (latest.input_tokens, latest.tokens) == (20, 200)
    assert (latest.proof_hash, latest.signature) == (later_proof, SIG[::-1])
    assert [r.counts for r in state.receipts(1)] == [Counts(20, 100), Counts(20, 200)]
    stored = state.get_session(1)
    assert stored.receipted == Counts(20, 200) and stored.last_proof_hash == later_proof
    # A receipt is only asked for what was served, so served never trails it.
    assert stored.served == Counts(20, 200)
    # A new prompt's input alone moves the receipt forward.
    state.store_receipt(1, Counts(45, 200), PROOF, SIG)
    assert state.get_session(1).receipted == Counts(45, 200)
    assert state.latest_receipt(2) is None and state.receipts(2) == []
    with pytest.raises(ValueError, match="32 bytes"):
        state.store_receipt(1, Counts(45, 300), b"short", SIG)
    with pytest.raises(ValueError, match="signature is empty"):
        state.store_receipt(1, Counts(45, 300), PROOF, b"")


def test_the_stored_tail_is_what_follows_the_last_receipt(state: NodeState) -> None:
    """What a resumed client is replayed: never a token a stored receipt covers, even when
    the connection's tail was taken while that receipt was being stored."""
    state.upsert_session(session(1))
    state.record_served(1, Counts(8, 32), tail(1, 32), 0)
    state.store_receipt(1, Counts(8, 16), PROOF, SIG)
    assert state.get_session(1).served_tail == tuple(tail(17, 32))
    # A tail snapshot from before the receipt landed, written after it.
    state.record_served(1, Counts(8, 40), tail(1, 40), 0)
    stored = state.get_session(1)
    assert stored.served_tail == tuple(tail(17, 40))
    assert stored.served == Counts(8, 40) and stored.receipted == Counts(8, 16)
    state.store_receipt(1, Counts(8, 40), PROOF, SIG)
    assert state.get_session(1).served_tail == ()


def test_a_restarted_node_still_has_everything(tmp_path: Path) -> None:
    path = tmp_path / "state" / "node.sqlite3"
    # Write from another process that dies without closing anything, like a crashed node.
    writer = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from inferledger.node.state import NodeState, HostedSession

        from inferledger.node.metering import Counts, SentToken

        state = NodeState(Path({str(path)!r}))
        state.upsert_session(HostedSession(
            3, "0xdep", "0xsig", bytes(32), {BIG_DEPOSIT}, 500_000_000, 2_000_000_000, 100,
            1_900_000_000
        ))
        row = state.start_request(3, "req-1", 9)
        sent = [SentToken(i, 1000 + i, f"t{{i}}") for i in range(151, 251)]
        state.record_served(3, Counts(9, 250), sent, 1)
        state.finish_request(row, 250, "budget")
        state.store_receipt(3, Counts(9, 200), bytes.fromhex({PROOF.hex()!r}), {SIG!r})
        state.set_status(3, "ended")
        os._exit(0)
        """
    )
    subprocess.run([sys.executable, "-c", writer], check=True, timeout=60)

    restarted = NodeState(path)
    restored = restarted.get_session(3)
    assert restored is not None
    assert (restored.served, restored.receipted) == (Counts(9, 250), Counts(9, 200))
    assert restored.served_tail == tuple(tail(201, 250)) and restored.abandoned == 1
    assert restored.deposit == BIG_DEPOSIT
    assert (restored.input_price_per_mtok, restored.output_price_per_mtok) == (
        500_000_000,
        2_000_000_000,
    )
    assert restored.status == "ended" and restored.last_proof_hash == PROOF
    latest = restarted.latest_receipt(3)
    assert latest is not None and latest.signature == SIG and latest.counts == Counts(9, 200)
    assert restarted.list_requests(3)[0].finish_reason == "budget"
    # The restarted node still refuses to go backwards.
    with pytest.raises(ValueError):
        restarted.store_receipt(3, Counts(9, 200), PROOF, SIG)
    restarted.close()


def test_wal_mode_and_schema_version(tmp_path: Path, state: NodeState) -> None:
    assert state.journal_mode() == "wal"
    assert state.schema_version() == SCHEMA_VERSION >= 1
    with sqlite3.connect(state.path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION

    newer = tmp_path / "newer.sqlite3"
    with sqlite3.connect(newer) as raw:
        raw.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(StateError, match="newer than this inferledger"):
        NodeState(newer)


def test_concurrent_writers_lose_no_updates(state: NodeState) -> None:
    for session_id in (1, 2):
        state.upsert_session(session(session_id))
    threads_count, rounds = 8, 50
    errors: list[BaseException] = []
    refused: list[int] = []

    def work(index: int) -> None:
        try:
            for step in range(1, rounds + 1):
                row = state.start_request(1, f"t{index}-{step}", step)
                state.finish_request(row, step, "stop")
                try:
                    state.store_receipt(2, Counts(step, step), PROOF, SIG)
                except ValueError:
                    refused.append(step)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    requests = state.list_requests(1)
    assert len(requests) == threads_count * rounds
    assert all(
        r.finish_reason == "stop" and r.completion_tokens == r.prompt_tokens for r in requests
    )
    receipts = [r.tokens for r in state.receipts(2)]
    # Every accepted receipt beat the previous one; every attempt was accepted or refused.
    assert receipts == sorted(set(receipts)) and receipts[-1] == rounds
    assert len(receipts) + len(refused) == threads_count * rounds
    assert state.get_session(2).receipted == Counts(rounds, rounds)
    assert state.get_session(2).served == Counts(rounds, rounds)


def _version_3_database(path: Path) -> None:
    """A state file as inferledger wrote it before input tokens were billed (schema 3):
    one price, output-only counters and receipts, and a finished settlement."""
    with sqlite3.connect(path) as raw:
        for steps in _MIGRATIONS[:3]:
            for statement in steps:
                raw.execute(statement)
        raw.execute("PRAGMA user_version=3")
        raw.execute(
            "INSERT INTO sessions (session_id, depositor, signer, model_id, deposit, "
            "price_per_mtok, proof_interval, expires_at, tokens_generated, tokens_receipted, "
            "last_proof_hash, status, created_at, updated_at, last_transcript_hash) "
            "VALUES (4, '0xdep', '0xsig', ?, ?, '2000000000', 100, 1900000000, 130, 120, ?, "
            "'settled', 1.0, 2.0, ?)",
            (MODEL_ID.hex(), str(BIG_DEPOSIT), PROOF.hex(), "ef" * 32),
        )
        for tokens in (100, 120):
            raw.execute(
                "INSERT INTO receipts (session_id, tokens, proof_hash, signature, received_at) "
                "VALUES (4, ?, ?, ?, 3.0)",
                (tokens, PROOF.hex(), SIG.hex()),
            )
        raw.execute(
            "INSERT INTO settlements (session_id, reason, status, due_at, attempts, tx_hash, "
            "tokens, host_amount, fee, refund, refund_credited, created_at, updated_at) "
            "VALUES (4, 'end', 'settled', 1.0, 1, '0xabc', 120, '216000', '24000', '1760000', "
            "0, 1.0, 2.0)"
        )


def test_a_version_3_database_migrates_and_keeps_its_receipts(tmp_path: Path) -> None:
    from inferledger.node.outbox import Outbox

    path = tmp_path / "v3.sqlite3"
    _version_3_database(path)
    with NodeState(path) as migrated:
        assert migrated.schema_version() == SCHEMA_VERSION == 6
        # A settled session from before v6 still has its paid amount to release.
        assert migrated.unreleased_sessions() == [4]
        migrated.mark_released(4)
        migrated.mark_released(4)  # once is enough; again changes nothing
        assert migrated.unreleased_sessions() == []
        record = migrated.get_session(4)
        assert record is not None
        # The one price was the output price; prompts were free; tokens after the last
        # receipt were never kept, so none is owed or replayed (a resume starts at 120).
        assert (record.input_price_per_mtok, record.output_price_per_mtok) == (0, 2_000_000_000)
        assert record.served == Counts(0, 120) and record.receipted == Counts(0, 120)
        assert record.served_tail == () and record.abandoned == 0
        assert record.deposit == BIG_DEPOSIT and record.status == "settled"
        assert record.last_proof_hash == PROOF
        assert record.last_transcript_hash == bytes.fromhex("ef" * 32)
        receipts = migrated.receipts(4)
        assert [(r.input_tokens, r.tokens) for r in receipts] == [(0, 100), (0, 120)]
        assert all(r.signature == SIG and r.proof_hash == PROOF for r in receipts)
        latest = migrated.latest_receipt(4)
        assert latest is not None and latest.counts == Counts(0, 120)
        settlement = Outbox(migrated).settlement(4)
        assert settlement is not None
        assert (settlement.input_tokens, settlement.tokens) == (None, 120)
        # Settled before confirmations were counted: final (the reconciler re-reads it).
        assert settlement.confirmed and settlement.block_number is None
        assert record.starts_at is None and migrated.open_discrepancies() == []
        assert (settlement.host_amount, settlement.status) == (216_000, "settled")
        # The migrated receipts keep refusing to go backwards, and a new one moves forward.
        with pytest.raises(ValueError, match="already has a receipt for 0/120"):
            migrated.store_receipt(4, Counts(0, 110), PROOF, SIG)
        migrated.store_receipt(4, Counts(7, 130), PROOF, SIG)
        assert migrated.get_session(4).receipted == Counts(7, 130)
    with NodeState(path) as reopened:  # opening again migrates nothing twice
        assert reopened.schema_version() == SCHEMA_VERSION
        assert [r.counts for r in reopened.receipts(4)][-1] == Counts(7, 130)


def test_a_state_file_belongs_to_one_deployment(tmp_path: Path) -> None:
    with NodeState(tmp_path / "node.sqlite3") as state:
        state.bind_deployment(31337, "0xAbC")
        state.bind_deployment(31337, "0xabc")  # same marketplace, any spelling
        with pytest.raises(StateError, match="0xabc on chain id 31337, not 0xDEF"):
            state.bind_deployment(31337, "0xDEF")
