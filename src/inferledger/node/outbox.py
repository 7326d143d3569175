"""The node's outbox: checkpoints, settlements and transactions, durable in its SQLite state.

Everything the node owes the chain is written here before it is sent (docs/architecture.md,
R3), so a crash or a restart loses nothing: the settlement worker reads this table, not memory.

Checkpoint states: ``proved`` (bundle stored, receipt requested) -> ``receipted`` (the user
signed it) -> ``queued`` (to submit on chain, by policy) -> ``confirmed`` (on chain);
``settled`` once a settlement paid for it. Tokens are never served twice (a resumed session
must receipt what was streamed), so no checkpoint is ever redone.

Settlement states: ``pending`` (due at ``due_at``) -> ``settled``; ``failed`` only when the
chain says the session can no longer be settled by this host (the reason is kept). A settled
row is ``confirmed`` once the node's ``confirmations`` blocks hold it; until then the worker
re-reads the session on chain, and a settlement the chain lost (a reorg, a dropped
transaction) goes back to ``pending`` (``reopen_settlement``).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Literal

from inferledger.node.state import NodeState, UnknownSession

CheckpointStatus = Literal["proved", "receipted", "queued", "confirmed", "settled", "failed"]
SettlementJobStatus = Literal["pending", "settled", "failed"]
SettlementReason = Literal[
    "end", "disconnect", "expiry", "close_requested", "restart", "unpaid", "chain"
]
"""Why a settlement was scheduled; ``chain``: the chain says the session ended (someone else
settled or finalized it, or a reconciliation found the node's books behind)."""


@dataclass(frozen=True)
class CheckpointRecord:
    session_id: int
    idx: int
    token_start: int
    token_end: int
    proof_hash: bytes
    transcript_hash: bytes
    prover: str
    unproven: bool
    proof_bytes: int
    proof_ms: float
    prover_error: str | None
    status: CheckpointStatus
    attempts: int = 0
    last_error: str | None = None
    tx_hash: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "index": self.idx,
            "tokens": [self.token_start, self.token_end],
            "proof_hash": "0x" + self.proof_hash.hex(),
            "prover": self.prover,
            "unproven": self.unproven,
            "proof_bytes": self.proof_bytes,
            "proof_ms": round(self.proof_ms, 3),
            "prover_error": self.prover_error,
            "status": self.status,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "tx_hash": self.tx_hash,
        }


@dataclass(frozen=True)
class SettlementRecord:
    session_id: int
    reason: SettlementReason
    status: SettlementJobStatus
    due_at: float
    attempts: int
    last_error: str | None
    tx_hash: str | None
    input_tokens: int | None
    tokens: int | None
    host_amount: int | None
    fee: int | None
    refund: int | None
    refund_credited: bool | None
    created_at: float
    block_number: int | None = None
    confirmed: bool = False

    def as_dict(self) -> dict[str, object]:
        def amount(value: int | None) -> str | None:
            return None if value is None else str(value)

        return {
            "reason": self.reason,
            "status": self.status,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "tx_hash": self.tx_hash,
            "input_tokens": self.input_tokens,
            "tokens": self.tokens,
            "host_amount": amount(self.host_amount),
            "fee": amount(self.fee),
            "refund": amount(self.refund),
            "refund_credited": self.refund_credited,
            "block_number": self.block_number,
            "confirmed": self.confirmed,
        }


class Outbox:
    """Checkpoint, settlement and transaction rows of one node's state."""

    def __init__(self, state: NodeState) -> None:
        self.state = state

    # Checkpoints ----------------------------------------------------------------------

    async def aadd_checkpoint(self, record: CheckpointRecord) -> None:
        """Record a proved checkpoint, in the next group commit with other sessions' receipts."""
        await self.state.in_group_commit(_add_checkpoint, record)

    def checkpoints(self, session_id: int) -> list[CheckpointRecord]:
        rows = self.state.query(
            "SELECT * FROM checkpoints WHERE session_id = ? ORDER BY idx", (session_id,)
        )
        return [_checkpoint(row) for row in rows]

    def next_checkpoint_index(self, session_id: int) -> int:
        """1 + the session's last checkpoint index."""
        rows = self.state.query(
            "SELECT MAX(idx) FROM checkpoints WHERE session_id = ?",
            (session_id,),
        )
        return int(rows[0][0] or 0) + 1

    def set_checkpoint_status(
        self,
        session_id: int,
        token_end: int,
        status: CheckpointStatus,
        *,
        error: str | None = None,
        tx_hash: str | None = None,
        attempted: bool = False,
    ) -> None:
        with self.state.transaction() as db:
            db.execute(
                "UPDATE checkpoints SET status = ?, last_error = COALESCE(?, last_error), "
                "tx_hash = COALESCE(?, tx_hash), attempts = attempts + ?, updated_at = ? "
                "WHERE session_id = ? AND token_end = ?",
                (status, error, tx_hash, int(attempted), time.time(), session_id, token_end),
            )

    def checkpoints_with_status(self, status: CheckpointStatus) -> list[CheckpointRecord]:
        rows = self.state.query(
            "SELECT * FROM checkpoints WHERE status = ? ORDER BY session_id, idx", (status,)
        )
        return [_checkpoint(row) for row in rows]

    def mark_settled_checkpoints(self, session_id: int, tokens: int) -> None:
        """Checkpoints a settlement paid for; later, unpaid ones keep their state."""
        with self.state.transaction() as db:
            db.execute(
                "UPDATE checkpoints SET status = 'settled', updated_at = ? WHERE session_id = ? "
                "AND token_end <= ? AND status IN ('receipted', 'queued', "
                "'confirmed')",
                (time.time(), session_id, tokens),
            )

    # Settlements ----------------------------------------------------------------------

    def schedule_settlement(
        self, session_id: int, reason: SettlementReason, due_at: float
    ) -> SettlementRecord:
        """Ask for a settlement; an earlier-due pending one keeps its time, a settled one stays.

        A session marked ``ended`` is settled by the worker even if the node restarts first.
        """
        now = time.time()
        with self.state.transaction() as db:
            row = db.execute(
                "SELECT status, due_at FROM settlements WHERE session_id = ?", (session_id,)
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO settlements (session_id, reason, status, due_at, created_at, "
                    "updated_at) VALUES (?, ?, 'pending', ?, ?, ?)",
                    (session_id, reason, due_at, now, now),
                )
            elif row["status"] == "pending" and due_at < row["due_at"]:
                db.execute(
                    "UPDATE settlements SET reason = ?, due_at = ?, updated_at = ? "
                    "WHERE session_id = ?",
                    (reason, due_at, now, session_id),
                )
            db.execute(
                "UPDATE sessions SET status = CASE WHEN status IN ('settled', 'failed') "
                "THEN status ELSE 'ended' END, updated_at = ? WHERE session_id = ?",
                (now, session_id),
            )
            return _settlement(
                db.execute(
                    "SELECT * FROM settlements WHERE session_id = ?", (session_id,)
                ).fetchone()
            )

    def cancel_disconnect_settlement(self, session_id: int) -> bool:
        """The client came back within the grace period: keep serving instead of settling."""
        with self.state.transaction() as db:
            cursor = db.execute(
                "DELETE FROM settlements WHERE session_id = ? AND status = 'pending' "
                "AND reason IN ('disconnect', 'restart')",
                (session_id,),
            )
            if cursor.rowcount:
                db.execute(
                    "UPDATE sessions SET status = 'open', updated_at = ? WHERE session_id = ?",
                    (time.time(), session_id),
                )
            return cursor.rowcount > 0

    def settlement(self, session_id: int) -> SettlementRecord | None:
        rows = self.state.query("SELECT * FROM settlements WHERE session_id = ?", (session_id,))
        return _settlement(rows[0]) if rows else None

    def due_settlements(self, now: float) -> list[SettlementRecord]:
        rows = self.state.query(
            "SELECT * FROM settlements WHERE status = 'pending' AND due_at <= ? ORDER BY due_at",
            (now,),
        )
        return [_settlement(row) for row in rows]

    def retry_settlement(self, session_id: int, error: str, due_at: float) -> None:
        with self.state.transaction() as db:
            db.execute(
                "UPDATE settlements SET attempts = attempts + 1, last_error = ?, due_at = ?, "
                "updated_at = ? WHERE session_id = ?",
                (error, due_at, time.time(), session_id),
            )

    def finish_settlement(
        self,
        session_id: int,
        status: Literal["settled", "failed"],
        *,
        input_tokens: int | None = None,
        tokens: int | None = None,
        host_amount: int | None = None,
        fee: int | None = None,
        refund: int | None = None,
        refund_credited: bool | None = None,
        tx_hash: str | None = None,
        error: str | None = None,
        block_number: int | None = None,
        confirmed: bool = False,
    ) -> None:
        """Record the outcome and the session's final status in one transaction."""
        now = time.time()
        with self.state.transaction() as db:
            db.execute(
                "UPDATE settlements SET status = ?, input_tokens = ?, tokens = ?, host_amount = ?, "
                "fee = ?, refund = ?, refund_credited = ?, tx_hash = ?, block_number = ?, "
                "confirmed = ?, last_error = COALESCE(?, last_error), attempts = attempts + 1, "
                "updated_at = ? WHERE session_id = ?",
                (
                    status,
                    input_tokens,
                    tokens,
                    _str_or_none(host_amount),
                    _str_or_none(fee),
                    _str_or_none(refund),
                    None if refund_credited is None else int(refund_credited),
                    tx_hash,
                    block_number,
                    int(confirmed),
                    error,
                    now,
                    session_id,
                ),
            )
            db.execute(
                "UPDATE sessions SET status = ?, updated_at = ? WHERE session_id = ?",
                (status, now, session_id),
            )

    def unconfirmed_settlements(self) -> list[SettlementRecord]:
        """Settled on chain, but not yet under the node's ``confirmations`` blocks."""
        rows = self.state.query(
            "SELECT * FROM settlements WHERE status = 'settled' AND confirmed = 0 "
            "ORDER BY session_id"
        )
        return [_settlement(row) for row in rows]

    def confirm_settlement(self, session_id: int) -> None:
        with self.state.transaction() as db:
            db.execute(
                "UPDATE settlements SET confirmed = 1, updated_at = ? WHERE session_id = ?",
                (time.time(), session_id),
            )

    def reopen_settlement(self, session_id: int, note: str) -> None:
        """The chain no longer holds this session's settlement: settle it again, now."""
        now = time.time()
        with self.state.transaction() as db:
            db.execute(
                "UPDATE settlements SET status = 'pending', due_at = ?, tx_hash = NULL, "
                "block_number = NULL, confirmed = 0, input_tokens = NULL, tokens = NULL, "
                "host_amount = NULL, fee = NULL, refund = NULL, refund_credited = NULL, "
                "last_error = ?, updated_at = ? WHERE session_id = ?",
                (now, note, now, session_id),
            )
            db.execute(
                "UPDATE sessions SET status = 'ended', updated_at = ? WHERE session_id = ?",
                (now, session_id),
            )
            db.execute(
                "UPDATE checkpoints SET status = 'receipted', updated_at = ? "
                "WHERE session_id = ? AND status = 'settled'",
                (now, session_id),
            )

    # Transactions ---------------------------------------------------------------------

    def start_transaction(self, session_id: int, action: str) -> int:
        """Record a transaction about to be sent; returns its row id."""
        now = time.time()
        with self.state.transaction() as db:
            cursor = db.execute(
                "INSERT INTO transactions (session_id, action, status, created_at, updated_at) "
                "VALUES (?, ?, 'sending', ?, ?)",
                (session_id, action, now, now),
            )
            return int(cursor.lastrowid or 0)

    def update_transaction(
        self, row_id: int, status: str, *, tx_hash: str | None = None, error: str | None = None
    ) -> None:
        with self.state.transaction() as db:
            db.execute(
                "UPDATE transactions SET status = ?, tx_hash = COALESCE(?, tx_hash), "
                "error = COALESCE(?, error), updated_at = ? WHERE id = ?",
                (status, tx_hash, error, time.time(), row_id),
            )

    def transactions(self, session_id: int) -> list[dict[str, object]]:
        rows = self.state.query(
            "SELECT action, tx_hash, status, error FROM transactions WHERE session_id = ? "
            "ORDER BY id",
            (session_id,),
        )
        return [dict(row) for row in rows]


def _str_or_none(value: int | None) -> str | None:
    return None if value is None else str(value)


def _int_or_none(value: str | None) -> int | None:
    return None if value is None else int(value)


def _checkpoint(row: object) -> CheckpointRecord:
    r = dict(row)  # type: ignore[call-overload]
    return CheckpointRecord(
        session_id=r["session_id"],
        idx=r["idx"],
        token_start=r["token_start"],
        token_end=r["token_end"],
        proof_hash=bytes.fromhex(r["proof_hash"]),
        transcript_hash=bytes.fromhex(r["transcript_hash"]),
        prover=r["prover"],
        unproven=bool(r["unproven"]),
        proof_bytes=r["proof_bytes"],
        proof_ms=r["proof_ms"],
        prover_error=r["prover_error"],
        status=r["status"],
        attempts=r["attempts"],
        last_error=r["last_error"],
        tx_hash=r["tx_hash"],
    )


def _settlement(row: object) -> SettlementRecord:
    r = dict(row)  # type: ignore[call-overload]
    credited = r["refund_credited"]
    return SettlementRecord(
        session_id=r["session_id"],
        reason=r["reason"],
        status=r["status"],
        due_at=r["due_at"],
        attempts=r["attempts"],
        last_error=r["last_error"],
        tx_hash=r["tx_hash"],
        input_tokens=r["input_tokens"],
        tokens=r["tokens"],
        host_amount=_int_or_none(r["host_amount"]),
        fee=_int_or_none(r["fee"]),
        refund=_int_or_none(r["refund"]),
        refund_credited=None if credited is None else bool(credited),
        created_at=r["created_at"],
        block_number=r["block_number"],
        confirmed=bool(r["confirmed"]),
    )


def _add_checkpoint(db: sqlite3.Connection, record: CheckpointRecord) -> None:
    now = time.time()
    if (
        db.execute("SELECT 1 FROM sessions WHERE session_id = ?", (record.session_id,)).fetchone()
        is None
    ):
        raise UnknownSession(record.session_id)
    db.execute(
        """
        INSERT INTO checkpoints (
            session_id, idx, token_start, token_end, proof_hash, transcript_hash,
            prover, unproven, proof_bytes, proof_ms, prover_error, status,
            created_at, updated_at
        ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
        """,
        (
            record.session_id,
            record.idx,
            record.token_start,
            record.token_end,
            record.proof_hash.hex(),
            record.transcript_hash.hex(),
            record.prover,
            int(record.unproven),
            record.proof_bytes,
            record.proof_ms,
            record.prover_error,
            record.status,
            now,
            now,
        ),
    )
