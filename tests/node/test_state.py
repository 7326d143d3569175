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

from inferledger.node.state import (
    SCHEMA_VERSION,
    NodeState,
    SessionRecord,
    StateError,
    UnknownSession,
)

MODEL_ID = bytes.fromhex("ab" * 32)
PROOF = bytes.fromhex("cd" * 32)
SIG = bytes(range(65))
BIG_DEPOSIT = 10**30  # beyond int64: amounts are uint256 on chain


def session(session_id: int = 1, **changes: object) -> SessionRecord:
    fields: dict[str, object] = {
        "session_id": session_id,
        "depositor": "0x" + "11" * 20,
        "signer": "0x" + "22" * 20,
        "model_id": MODEL_ID,
        "deposit": 2_000_000,
        "price_per_mtok": 2_000_000_000,
        "proof_interval": 100,
        "expires_at": 1_900_000_000,
    }
    fields.update(changes)
    return SessionRecord(**fields)  # type: ignore[arg-type]


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
    assert got.tokens_generated == 0 and got.last_proof_hash is None
    assert state.get_session(8) is None

    assert state.add_generated(7, 40) == 40
    assert state.add_generated(7, 60) == 100
    state.set_status(7, "ended")
    state.upsert_session(session(9))
    assert [s.session_id for s in state.list_sessions()] == [7, 9]
    assert [s.session_id for s in state.list_sessions("ended")] == [7]
    assert [s.session_id for s in state.list_sessions("open")] == [9]


def test_upsert_keeps_counters_and_status_of_an_existing_session(state: NodeState) -> None:
    first = state.upsert_session(session(1))
    state.add_generated(1, 150)
    state.store_receipt(1, 100, PROOF, SIG)
    state.set_status(1, "ended")

    again = state.upsert_session(session(1, tokens_generated=0, expires_at=1_900_000_500))
    assert again.tokens_generated == 150
    assert again.tokens_receipted == 100 and again.last_proof_hash == PROOF
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
        state.add_generated(5, 1)
    with pytest.raises(UnknownSession):
        state.set_status(5, "ended")
    with pytest.raises(UnknownSession):
        state.start_request(5, "r", 1)
    with pytest.raises(UnknownSession):
        state.store_receipt(5, 1, PROOF, SIG)
    state.upsert_session(session(5))
    with pytest.raises(ValueError, match="unknown session status 'done'"):
        state.set_status(5, "done")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be >= 0"):
        state.add_generated(5, -1)


def test_receipts_only_move_forward(state: NodeState) -> None:
    state.upsert_session(session(1))
    state.store_receipt(1, 100, PROOF, SIG)
    later_proof = bytes.fromhex("ee" * 32)
    state.store_receipt(1, 200, later_proof, SIG[::-1])

    for stale in (200, 150, 0):
        with pytest.raises(ValueError, match=r"already has a receipt for 200 tokens"):
            state.store_receipt(1, stale, PROOF, SIG)

    latest = state.latest_receipt(1)
    assert latest is not None
    assert (latest.tokens, latest.proof_hash, latest.signature) == (200, later_proof, SIG[::-1])
    assert [r.tokens for r in state.receipts(1)] == [100, 200]
    stored = state.get_session(1)
    assert stored.tokens_receipted == 200 and stored.last_proof_hash == later_proof
    assert state.latest_receipt(2) is None and state.receipts(2) == []
    with pytest.raises(ValueError, match="32 bytes"):
        state.store_receipt(1, 300, b"short", SIG)


def test_a_restarted_node_still_has_everything(tmp_path: Path) -> None:
    path = tmp_path / "state" / "node.sqlite3"
    # Write from another process that dies without closing anything, like a crashed node.
    writer = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from inferledger.node.state import NodeState, SessionRecord

        state = NodeState(Path({str(path)!r}))
        state.upsert_session(SessionRecord(
            3, "0xdep", "0xsig", bytes(32), {BIG_DEPOSIT}, 2_000_000_000, 100, 1_900_000_000
        ))
        state.add_generated(3, 250)
        row = state.start_request(3, "req-1", 9)
        state.finish_request(row, 250, "budget")
        state.store_receipt(3, 200, bytes.fromhex({PROOF.hex()!r}), {SIG!r})
        state.set_status(3, "ended")
        os._exit(0)
        """
    )
    subprocess.run([sys.executable, "-c", writer], check=True, timeout=60)

    restarted = NodeState(path)
    restored = restarted.get_session(3)
    assert restored is not None
    assert (restored.tokens_generated, restored.tokens_receipted) == (250, 200)
    assert restored.deposit == BIG_DEPOSIT
    assert restored.status == "ended" and restored.last_proof_hash == PROOF
    latest = restarted.latest_receipt(3)
    assert latest is not None and latest.signature == SIG
    assert restarted.list_requests(3)[0].finish_reason == "budget"
    # The restarted node still refuses to go backwards.
    with pytest.raises(ValueError):
        restarted.store_receipt(3, 200, PROOF, SIG)
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
                state.add_generated(1 + index % 2, 1)
                row = state.start_request(1, f"t{index}-{step}", step)
                state.finish_request(row, step, "stop")
                try:
                    state.store_receipt(2, step, PROOF, SIG)
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
    per_session = threads_count // 2 * rounds
    assert state.get_session(1).tokens_generated == per_session
    assert state.get_session(2).tokens_generated == per_session
    assert len(state.list_requests(1)) == threads_count * rounds
    receipts = [r.tokens for r in state.receipts(2)]
    # Every accepted receipt beat the previous one; every attempt was accepted or refused.
    assert receipts == sorted(set(receipts)) and receipts[-1] == rounds
    assert len(receipts) + len(refused) == threads_count * rounds
    assert state.get_session(2).tokens_receipted == rounds


def test_a_state_file_belongs_to_one_deployment(tmp_path: Path) -> None:
    with NodeState(tmp_path / "node.sqlite3") as state:
        state.bind_deployment(31337, "0xAbC")
        state.bind_deployment(31337, "0xabc")  # same marketplace, any spelling
        with pytest.raises(StateError, match="0xabc on chain id 31337, not 0xDEF"):
            state.bind_deployment(31337, "0xDEF")
