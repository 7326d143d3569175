"""The node's durable state: sessions, requests, signed receipts and the outbox (SQLite).

Checkpoints, settlements and transactions live in the same database (see
:mod:`inferledger.node.outbox`), so a receipt and its checkpoint commit together.

A signed receipt is the host's claim to payment, so it is acknowledged only after it is on
disk: every write commits before its method returns, with ``synchronous=FULL``. In WAL mode
``NORMAL`` survives a crash of the process but may lose the last commits on power loss or an
OS crash; a lost receipt is lost money, and one fsync per receipt or request is cheap.

One connection is shared by all threads behind a lock: writes are serialised anyway, and the
lock also makes read-modify-write sequences (counters, receipt checks) atomic.

The writes of the streaming path (what was served, receipts, requests) have ``a``-prefixed
async twins that run in one writer thread, which commits every write waiting at the time in
one transaction (one fsync), each write in its own savepoint so that one refused write
fails alone; each returns once the commit holding it is on disk, exactly as the blocking
method would. Many sessions' receipts thus cost one commit and one wake-up of the event
loop, not one each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

from inferledger.chain.contracts import SessionInfo
from inferledger.node.metering import Counts, SentToken
from inferledger.node.threads import name_os_thread

HostedStatus = Literal["open", "ended", "settled", "failed"]
"""``open``: serving; ``ended``: the client said end or left, or the chain asked for a close,
and a settlement is pending; ``settled``: paid out on chain; ``failed``: settlement gave up
(the reason is in the node's logs and transactions)."""

SESSION_STATUSES: frozenset[str] = frozenset(get_args(HostedStatus))

# One entry per schema version; entry i moves a database from version i to i + 1.
# Amounts in token base units are TEXT: they are uint256 on chain and may exceed int64.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE sessions (
            session_id INTEGER PRIMARY KEY,
            depositor TEXT NOT NULL,
            signer TEXT NOT NULL,
            model_id TEXT NOT NULL,
            deposit TEXT NOT NULL,
            price_per_mtok TEXT NOT NULL,
            proof_interval INTEGER NOT NULL,
            expires_at INTEGER NOT NULL,
            tokens_generated INTEGER NOT NULL DEFAULT 0,
            tokens_receipted INTEGER NOT NULL DEFAULT 0,
            last_proof_hash TEXT,
            status TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )
        """,
        "CREATE INDEX sessions_by_status ON sessions (status)",
        """
        CREATE TABLE requests (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            session_id INTEGER NOT NULL REFERENCES sessions (session_id),
            request_id TEXT NOT NULL,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER,
            finish_reason TEXT,
            started_at REAL NOT NULL,
            finished_at REAL
        )
        """,
        "CREATE INDEX requests_by_session ON requests (session_id)",
        """
        CREATE TABLE receipts (
            session_id INTEGER NOT NULL REFERENCES sessions (session_id),
            tokens INTEGER NOT NULL,
            proof_hash TEXT NOT NULL,
            signature TEXT NOT NULL,
            received_at REAL NOT NULL,
            PRIMARY KEY (session_id, tokens)
        )
        """,
    ),
    (
        # proof_hash is the bundle's hash from here on; the transcript hash chain is kept apart.
        "ALTER TABLE sessions ADD COLUMN last_transcript_hash TEXT",
        """
        CREATE TABLE checkpoints (
            session_id INTEGER NOT NULL REFERENCES sessions (session_id),
            idx INTEGER NOT NULL,
            token_start INTEGER NOT NULL,
            token_end INTEGER NOT NULL,
            proof_hash TEXT NOT NULL,
            transcript_hash TEXT NOT NULL,
            prover TEXT NOT NULL,
            unproven INTEGER NOT NULL,
            proof_bytes INTEGER NOT NULL,
            proof_ms REAL NOT NULL,
            prover_error TEXT,
            status TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            tx_hash TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (session_id, idx)
        )
        """,
        "CREATE INDEX checkpoints_by_status ON checkpoints (status)",
        """
        CREATE TABLE settlements (
            session_id INTEGER PRIMARY KEY REFERENCES sessions (session_id),
            reason TEXT NOT NULL,
            status TEXT NOT NULL,
            due_at REAL NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            tx_hash TEXT,
            tokens INTEGER,
            host_amount TEXT,
            fee TEXT,
            refund TEXT,
            refund_credited INTEGER,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )
        """,
        """
        CREATE TABLE transactions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            session_id INTEGER NOT NULL,
            action TEXT NOT NULL,
            tx_hash TEXT,
            status TEXT NOT NULL,
            error TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )
        """,
    ),
    ("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",),
    (
        # Input (prompt) tokens are billed too; tokens_generated/tokens_receipted count output
        # tokens. served_tail holds the output tokens sent after the last receipt, replayed
        # to a resuming client; abandoned counts connections that left owing a receipt.
        "ALTER TABLE sessions RENAME COLUMN price_per_mtok TO output_price_per_mtok",
        "ALTER TABLE sessions ADD COLUMN input_price_per_mtok TEXT NOT NULL DEFAULT '0'",
        "ALTER TABLE sessions ADD COLUMN input_served INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE sessions ADD COLUMN input_receipted INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE sessions ADD COLUMN served_tail TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE sessions ADD COLUMN abandoned INTEGER NOT NULL DEFAULT 0",
        # Before v4 tokens after the last receipt were neither billed nor kept: none to replay.
        "UPDATE sessions SET tokens_generated = tokens_receipted",
        """
        CREATE TABLE receipts_v4 (
            session_id INTEGER NOT NULL REFERENCES sessions (session_id),
            input_tokens INTEGER NOT NULL,
            tokens INTEGER NOT NULL,
            proof_hash TEXT NOT NULL,
            signature TEXT NOT NULL,
            received_at REAL NOT NULL,
            PRIMARY KEY (session_id, input_tokens, tokens)
        )
        """,
        "INSERT INTO receipts_v4 SELECT session_id, 0, tokens, proof_hash, signature, "
        "received_at FROM receipts",
        "DROP TABLE receipts",
        "ALTER TABLE receipts_v4 RENAME TO receipts",
        "ALTER TABLE settlements ADD COLUMN input_tokens INTEGER",
    ),
    (
        # starts_at: the session's creation time on chain (its length sets the settle lead).
        # A settlement is final once `confirmations` blocks hold it; rows settled before v5
        # are taken as confirmed (the reconciler re-reads them from the chain at start).
        "ALTER TABLE sessions ADD COLUMN starts_at INTEGER",
        "ALTER TABLE settlements ADD COLUMN block_number INTEGER",
        "ALTER TABLE settlements ADD COLUMN confirmed INTEGER NOT NULL DEFAULT 0",
        "UPDATE settlements SET confirmed = 1 WHERE status = 'settled'",
        """
        CREATE TABLE discrepancies (
            session_id INTEGER NOT NULL REFERENCES sessions (session_id),
            kind TEXT NOT NULL,
            detail TEXT NOT NULL,
            repaired INTEGER NOT NULL,
            found_at REAL NOT NULL,
            resolved_at REAL,
            PRIMARY KEY (session_id, kind)
        )
        """,
    ),
    (
        # Settled sessions whose paid amount the node released from its exposure cap.
        """
        CREATE TABLE exposure_released (
            session_id INTEGER PRIMARY KEY REFERENCES sessions (session_id),
            released_at REAL NOT NULL
        )
        """,
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)


class StateError(Exception):
    """The state database cannot be used (e.g. written by a newer inferledger)."""


class UnknownSession(KeyError):
    """No session with this id in the node's state."""


@dataclass(frozen=True)
class HostedSession:
    """A session as the node tracks it; terms come from the chain, counters from serving."""

    session_id: int
    depositor: str
    signer: str
    model_id: bytes
    deposit: int
    input_price_per_mtok: int
    output_price_per_mtok: int
    proof_interval: int
    expires_at: int
    starts_at: int | None = None
    tokens_generated: int = 0
    tokens_receipted: int = 0
    input_served: int = 0
    input_receipted: int = 0
    served_tail: tuple[SentToken, ...] = ()
    abandoned: int = 0
    last_proof_hash: bytes | None = None
    last_transcript_hash: bytes | None = None
    status: HostedStatus = "open"
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def served(self) -> Counts:
        return Counts(self.input_served, self.tokens_generated)

    @property
    def receipted(self) -> Counts:
        return Counts(self.input_receipted, self.tokens_receipted)


@dataclass(frozen=True)
class Discrepancy:
    """Where the node's books and the chain disagree about a session (see reconciler.py)."""

    session_id: int
    kind: str
    detail: str
    repaired: bool


@dataclass(frozen=True)
class RequestRecord:
    id: int
    session_id: int
    request_id: str
    prompt_tokens: int
    completion_tokens: int | None
    finish_reason: str | None
    started_at: float
    finished_at: float | None


@dataclass(frozen=True)
class StoredReceipt:
    """A user's signed receipt for cumulative input and output (``tokens``) tokens."""

    session_id: int
    input_tokens: int
    tokens: int
    proof_hash: bytes
    signature: bytes
    received_at: float

    @property
    def counts(self) -> Counts:
        return Counts(self.input_tokens, self.tokens)


T = TypeVar("T")
_BATCH_MAX = 512  # writes in one group commit at most


class _Writer:
    """One thread running queued writes in group commits (see the module's docstring)."""

    def __init__(self, state: NodeState) -> None:
        self._state = state
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    async def run(self, op: Callable[..., T], *args: Any) -> T:
        """``op(db, *args)`` in the next group commit; its result once that commit is done."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if self._thread is None:
            self._start()
        self._queue.put((op, args, loop, future))
        return await future

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="inferledger-state-writer", daemon=True
                )
                self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def _loop(self) -> None:
        name_os_thread()
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < _BATCH_MAX:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(item)
            self._commit(batch)

    def _commit(self, batch: list[Any]) -> None:
        outcomes: list[tuple[Any, Exception | None]] = []
        state = self._state
        try:
            with state._lock:
                db = state._conn
                db.execute("BEGIN IMMEDIATE")
                try:
                    for op, args, _loop, _future in batch:
                        db.execute("SAVEPOINT write")
                        try:
                            outcomes.append((op(db, *args), None))
                            db.execute("RELEASE write")
                        except Exception as exc:
                            db.execute("ROLLBACK TO write")
                            db.execute("RELEASE write")
                            outcomes.append((None, exc))
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
        except Exception as exc:  # the commit itself failed: so did every write in it
            outcomes = [(None, exc)] * len(batch)
        by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        for (_op, _args, loop, future), (value, error) in zip(batch, outcomes, strict=True):
            by_loop.setdefault(loop, []).append((future, value, error))
        for loop, settled in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(_settle_futures, settled)


def _settle_futures(settled: list[tuple[asyncio.Future[Any], Any, Exception | None]]) -> None:
    for future, value, error in settled:
        if future.done():
            continue  # its waiter was cancelled; the write itself stands
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)


class NodeState:
    """The node's SQLite state at ``path`` (created, or migrated, on open)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so nothing commits implicitly.
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        self._writer = _Writer(self)
        try:
            self._configure()
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    def _configure(self) -> None:
        mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StateError(f"{self.path}: SQLite refused WAL mode (got {mode!r})")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        # Another process (the CLI) may read or write briefly; wait rather than fail.
        self._conn.execute("PRAGMA busy_timeout=5000")

    def _migrate(self) -> None:
        with self.transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StateError(
                    f"{self.path} has schema version {version}, newer than this inferledger "
                    f"({SCHEMA_VERSION}): upgrade inferledger or use another state file"
                )
            for steps in _MIGRATIONS[version:]:
                for statement in steps:
                    db.execute(statement)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Hold the lock and one write transaction; commit on success, roll back on error."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    async def in_group_commit(self, op: Callable[..., T], *args: Any) -> T:
        """``op(db, *args)`` in the next group commit (see ``_Writer``), off the event loop;
        its result once that commit is on disk. For the outbox's writes on a hot path."""
        return await self._writer.run(op, *args)

    def query(self, sql: str, args: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    # Sessions ------------------------------------------------------------------

    def upsert_session(self, record: HostedSession) -> HostedSession:
        """Store a session's terms; an existing row keeps its counters, status and created_at.

        Returns the stored record, so a restarted node resumes from its saved counters.
        """
        _check_status(record.status)
        now = time.time()
        with self.transaction() as db:
            db.execute(
                """
                INSERT INTO sessions (
                    session_id, depositor, signer, model_id, deposit, input_price_per_mtok,
                    output_price_per_mtok, proof_interval, expires_at, starts_at,
                    tokens_generated, tokens_receipted, last_proof_hash, status, created_at,
                    updated_at
                ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (session_id) DO UPDATE SET
                    depositor = excluded.depositor,
                    signer = excluded.signer,
                    model_id = excluded.model_id,
                    deposit = excluded.deposit,
                    input_price_per_mtok = excluded.input_price_per_mtok,
                    output_price_per_mtok = excluded.output_price_per_mtok,
                    proof_interval = excluded.proof_interval,
                    expires_at = excluded.expires_at,
                    starts_at = COALESCE(excluded.starts_at, starts_at),
                    updated_at = excluded.updated_at
                """,
                (
                    record.session_id,
                    record.depositor,
                    record.signer,
                    record.model_id.hex(),
                    str(record.deposit),
                    str(record.input_price_per_mtok),
                    str(record.output_price_per_mtok),
                    record.proof_interval,
                    record.expires_at,
                    record.starts_at,
                    record.tokens_generated,
                    record.tokens_receipted,
                    _hex_or_none(record.last_proof_hash),
                    record.status,
                    record.created_at or now,
                    now,
                ),
            )
            return self._session_row(db, record.session_id)

    def get_session(self, session_id: int) -> HostedSession | None:
        rows = self.query("SELECT * FROM sessions WHERE session_id = ?", (session_id,))
        return _session(rows[0]) if rows else None

    def list_sessions(self, status: HostedStatus | None = None) -> list[HostedSession]:
        """Sessions by id, all of them or those with ``status``."""
        if status is None:
            rows = self.query("SELECT * FROM sessions ORDER BY session_id")
        else:
            _check_status(status)
            rows = self.query(
                "SELECT * FROM sessions WHERE status = ? ORDER BY session_id", (status,)
            )
        return [_session(row) for row in rows]

    def held_sessions(self) -> list[HostedSession]:
        """Sessions this node still owes a settlement (open or ended), by id."""
        rows = self.query(
            "SELECT * FROM sessions WHERE status IN ('open', 'ended') ORDER BY session_id"
        )
        return [_session(row) for row in rows]

    def record_served(
        self, session_id: int, served: Counts, tail: Sequence[SentToken], abandoned: int
    ) -> None:
        """Durably note what was served and the unreceipted tail, before a receipt for it is
        asked: a restarted or resumed session continues from here, never from less.

        Tokens of ``tail`` that a stored receipt already covers are dropped: the caller's
        tail may have been taken while that receipt was being stored, and a resumed client
        is replayed exactly the tokens after the last receipt."""
        with self.transaction() as db:
            _record_served(db, session_id, served, tail, abandoned)

    async def arecord_served(
        self, session_id: int, served: Counts, tail: Sequence[SentToken], abandoned: int
    ) -> None:
        """``record_served`` in the next group commit (see ``_Writer``), off the event loop."""
        await self._writer.run(_record_served, session_id, served, tuple(tail), abandoned)

    def set_status(self, session_id: int, status: HostedStatus) -> None:
        _check_status(status)
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE sessions SET status = ?, updated_at = ? WHERE session_id = ?",
                (status, time.time(), session_id),
            )
            if cursor.rowcount == 0:
                raise UnknownSession(session_id)

    # Requests ------------------------------------------------------------------

    def start_request(self, session_id: int, request_id: str, prompt_tokens: int) -> int:
        """Record a prompt about to be served; returns the row id for ``finish_request``."""
        with self.transaction() as db:
            return _start_request(db, session_id, request_id, prompt_tokens)

    async def astart_request(self, session_id: int, request_id: str, prompt_tokens: int) -> int:
        """``start_request`` in the next group commit, off the event loop."""
        return await self._writer.run(_start_request, session_id, request_id, prompt_tokens)

    def finish_request(
        self,
        row_id: int,
        completion_tokens: int,
        finish_reason: str,
        prompt_tokens: int | None = None,
    ) -> None:
        """Record how a request ended; ``prompt_tokens`` when only known at the end."""
        with self.transaction() as db:
            _finish_request(db, row_id, completion_tokens, finish_reason, prompt_tokens)

    async def afinish_request(
        self,
        row_id: int,
        completion_tokens: int,
        finish_reason: str,
        prompt_tokens: int | None = None,
    ) -> None:
        """``finish_request`` in the next group commit, off the event loop."""
        await self._writer.run(
            _finish_request, row_id, completion_tokens, finish_reason, prompt_tokens
        )

    def list_requests(self, session_id: int) -> list[RequestRecord]:
        rows = self.query("SELECT * FROM requests WHERE session_id = ? ORDER BY id", (session_id,))
        return [RequestRecord(**dict(row)) for row in rows]

    # Receipts ------------------------------------------------------------------

    def store_receipt(
        self,
        session_id: int,
        counts: Counts,
        proof_hash: bytes,
        signature: bytes,
        transcript_hash: bytes | None = None,
    ) -> StoredReceipt:
        """Durably store a signed receipt and advance the session's receipted counts.

        Receipts are cumulative, so neither count may fall below the last stored receipt's
        and one must exceed it: an older or repeated receipt is refused with ValueError
        rather than silently lowering the claim. Checkpoints the receipt covers turn
        ``receipted`` in the same transaction, and ``transcript_hash`` is where a resumed
        session continues its chain.
        """
        with self.transaction() as db:
            return _store_receipt(db, session_id, counts, proof_hash, signature, transcript_hash)

    async def astore_receipt(
        self,
        session_id: int,
        counts: Counts,
        proof_hash: bytes,
        signature: bytes,
        transcript_hash: bytes | None = None,
    ) -> StoredReceipt:
        """``store_receipt`` in the next group commit, off the event loop: it returns once
        the commit holding the receipt is on disk, as ``store_receipt`` does."""
        return await self._writer.run(
            _store_receipt, session_id, counts, proof_hash, signature, transcript_hash
        )

    def latest_receipt(self, session_id: int) -> StoredReceipt | None:
        rows = self.query(
            "SELECT * FROM receipts WHERE session_id = ? "
            "ORDER BY tokens DESC, input_tokens DESC LIMIT 1",
            (session_id,),
        )
        return _receipt(rows[0]) if rows else None

    def receipts(self, session_id: int) -> list[StoredReceipt]:
        """All receipts of a session, oldest (fewest tokens) first."""
        rows = self.query(
            "SELECT * FROM receipts WHERE session_id = ? ORDER BY tokens, input_tokens",
            (session_id,),
        )
        return [_receipt(row) for row in rows]

    # Lifecycle -----------------------------------------------------------------

    def unreleased_sessions(self) -> list[int]:
        """Settled sessions whose paid amount still counts against the exposure cap."""
        rows = self.query(
            "SELECT session_id FROM sessions WHERE status = 'settled' AND session_id NOT IN "
            "(SELECT session_id FROM exposure_released) ORDER BY session_id"
        )
        return [int(row["session_id"]) for row in rows]

    def mark_released(self, session_id: int) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO exposure_released VALUES (?, ?)", (session_id, time.time())
            )

    def bind_deployment(self, chain_id: int, marketplace: str) -> None:
        """Tie this database to one marketplace: session ids restart at 1 in every
        deployment, so another deployment's sessions would be mistaken for these."""
        identity = f"{chain_id}:{marketplace.lower()}"
        with self.transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'deployment'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta (key, value) VALUES ('deployment', ?)", (identity,))
            elif row[0] != identity:
                theirs_chain, theirs_market = row[0].split(":")
                raise StateError(
                    f"{self.path} holds the sessions of marketplace {theirs_market} on chain id "
                    f"{theirs_chain}, not {marketplace} on chain id {chain_id}"
                )

    def chain_cursor(self) -> tuple[int, str] | None:
        """The last block the chain watcher scanned, and its hash (None before the first)."""
        rows = self.query("SELECT value FROM meta WHERE key = 'chain_cursor'")
        if not rows:
            return None
        block, block_hash = rows[0][0].split(":")
        return int(block), block_hash

    def set_chain_cursor(self, block: int, block_hash: str) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('chain_cursor', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (f"{block}:{block_hash}",),
            )

    # Discrepancies with the chain ------------------------------------------------

    def note_discrepancy(self, session_id: int, kind: str, detail: str, repaired: bool) -> bool:
        """Record what the reconciler found; True when it is new (not already open)."""
        with self.transaction() as db:
            row = db.execute(
                "SELECT resolved_at FROM discrepancies WHERE session_id = ? AND kind = ?",
                (session_id, kind),
            ).fetchone()
            db.execute(
                "INSERT INTO discrepancies (session_id, kind, detail, repaired, found_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (session_id, kind) DO UPDATE SET "
                "detail = excluded.detail, repaired = excluded.repaired, "
                "found_at = CASE WHEN resolved_at IS NULL THEN found_at ELSE excluded.found_at "
                "END, resolved_at = NULL",
                (session_id, kind, detail, int(repaired), time.time()),
            )
            return row is None or row[0] is not None

    def resolve_discrepancies(self, session_id: int, keep: Sequence[str] = ()) -> None:
        """The session agrees with the chain again (except for the kinds in ``keep``)."""
        marks = ", ".join("?" for _ in keep) or "''"
        with self.transaction() as db:
            db.execute(
                "UPDATE discrepancies SET resolved_at = ? WHERE session_id = ? "
                f"AND resolved_at IS NULL AND kind NOT IN ({marks})",
                (time.time(), session_id, *keep),
            )

    def open_discrepancies(self) -> list[Discrepancy]:
        rows = self.query(
            "SELECT * FROM discrepancies WHERE resolved_at IS NULL ORDER BY session_id, kind"
        )
        return [
            Discrepancy(r["session_id"], r["kind"], r["detail"], bool(r["repaired"])) for r in rows
        ]

    def schema_version(self) -> int:
        return int(self.query("PRAGMA user_version")[0][0])

    def journal_mode(self) -> str:
        return str(self.query("PRAGMA journal_mode")[0][0])

    def close(self) -> None:
        self._writer.stop()
        with self._lock:
            self._conn.close()

    def __enter__(self) -> NodeState:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _session_row(self, db: sqlite3.Connection, session_id: int) -> HostedSession:
        row = db.execute("SELECT * FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
        return _session(row)


def session_record(info: SessionInfo) -> HostedSession:
    """A new record of a session's terms, as the chain has them."""
    return HostedSession(
        session_id=info.session_id,
        depositor=info.depositor,
        signer=info.signer,
        model_id=info.model_id,
        deposit=info.deposit,
        input_price_per_mtok=info.input_price_per_mtok,
        output_price_per_mtok=info.output_price_per_mtok,
        proof_interval=info.proof_interval,
        expires_at=info.expires_at,
        starts_at=info.created_at,
    )


def _check_status(status: str) -> None:
    if status not in SESSION_STATUSES:
        raise ValueError(f"unknown session status {status!r}; one of {sorted(SESSION_STATUSES)}")


def _hex_or_none(value: bytes | None) -> str | None:
    return None if value is None else value.hex()


def _session(row: sqlite3.Row) -> HostedSession:
    proof_hash = row["last_proof_hash"]
    transcript = row["last_transcript_hash"]
    return HostedSession(
        session_id=row["session_id"],
        depositor=row["depositor"],
        signer=row["signer"],
        model_id=bytes.fromhex(row["model_id"]),
        deposit=int(row["deposit"]),
        input_price_per_mtok=int(row["input_price_per_mtok"]),
        output_price_per_mtok=int(row["output_price_per_mtok"]),
        proof_interval=row["proof_interval"],
        expires_at=row["expires_at"],
        starts_at=row["starts_at"],
        tokens_generated=row["tokens_generated"],
        tokens_receipted=row["tokens_receipted"],
        input_served=row["input_served"],
        input_receipted=row["input_receipted"],
        served_tail=tuple(SentToken(*t) for t in json.loads(row["served_tail"])),
        abandoned=row["abandoned"],
        last_proof_hash=None if proof_hash is None else bytes.fromhex(proof_hash),
        last_transcript_hash=None if transcript is None else bytes.fromhex(transcript),
        status=row["status"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _receipt(row: sqlite3.Row) -> StoredReceipt:
    return StoredReceipt(
        session_id=row["session_id"],
        input_tokens=row["input_tokens"],
        tokens=row["tokens"],
        proof_hash=bytes.fromhex(row["proof_hash"]),
        signature=bytes.fromhex(row["signature"]),
        received_at=row["received_at"],
    )


def _store_receipt(
    db: sqlite3.Connection,
    session_id: int,
    counts: Counts,
    proof_hash: bytes,
    signature: bytes,
    transcript_hash: bytes | None,
) -> StoredReceipt:
    if len(proof_hash) != 32:
        raise ValueError(f"proof_hash must be 32 bytes, got {len(proof_hash)}")
    if not signature:
        raise ValueError("receipt signature is empty")
    received_at = time.time()
    row = db.execute(
        "SELECT input_receipted, tokens_receipted, served_tail FROM sessions WHERE session_id = ?",
        (session_id,),
    ).fetchone()
    if row is None:
        raise UnknownSession(session_id)
    last = Counts(row[0], row[1])
    if not counts.covers(last) or counts == last:
        raise ValueError(
            f"receipt for {counts.input}/{counts.output} input/output tokens refused: "
            f"session {session_id} already has a receipt for {last.input}/{last.output}, "
            "and receipts must increase"
        )
    db.execute(
        "INSERT INTO receipts (session_id, input_tokens, tokens, proof_hash, signature, "
        "received_at) VALUES (?, ?, ?, ?, ?, ?)",
        (
            session_id,
            counts.input,
            counts.output,
            proof_hash.hex(),
            signature.hex(),
            received_at,
        ),
    )
    tail = [t for t in json.loads(row[2]) if t[0] > counts.output]
    db.execute(
        "UPDATE sessions SET input_receipted = ?, tokens_receipted = ?, "
        "input_served = MAX(input_served, ?), tokens_generated = MAX(tokens_generated, ?), "
        "served_tail = ?, last_proof_hash = ?, "
        "last_transcript_hash = COALESCE(?, last_transcript_hash), updated_at = ? "
        "WHERE session_id = ?",
        (
            counts.input,
            counts.output,
            counts.input,
            counts.output,
            json.dumps(tail),
            proof_hash.hex(),
            _hex_or_none(transcript_hash),
            received_at,
            session_id,
        ),
    )
    db.execute(
        "UPDATE checkpoints SET status = 'receipted', updated_at = ? "
        "WHERE session_id = ? AND token_end <= ? AND status = 'proved'",
        (received_at, session_id, counts.output),
    )
    return StoredReceipt(
        session_id,
        counts.input,
        counts.output,
        bytes(proof_hash),
        bytes(signature),
        received_at,
    )


def _record_served(
    db: sqlite3.Connection,
    session_id: int,
    served: Counts,
    tail: Sequence[SentToken],
    abandoned: int,
) -> None:
    row = db.execute(
        "SELECT tokens_receipted FROM sessions WHERE session_id = ?", (session_id,)
    ).fetchone()
    if row is None:
        raise UnknownSession(session_id)
    encoded = json.dumps([[t.index, t.token_id, t.text] for t in tail if t.index > row[0]])
    db.execute(
        "UPDATE sessions SET input_served = ?, tokens_generated = ?, served_tail = ?, "
        "abandoned = ?, updated_at = ? WHERE session_id = ?",
        (served.input, served.output, encoded, abandoned, time.time(), session_id),
    )


def _start_request(
    db: sqlite3.Connection, session_id: int, request_id: str, prompt_tokens: int
) -> int:
    known = db.execute("SELECT 1 FROM sessions WHERE session_id = ?", (session_id,))
    if known.fetchone() is None:
        raise UnknownSession(session_id)
    cursor = db.execute(
        "INSERT INTO requests (session_id, request_id, prompt_tokens, started_at) "
        "VALUES (?, ?, ?, ?)",
        (session_id, request_id, prompt_tokens, time.time()),
    )
    return int(cursor.lastrowid or 0)


def _finish_request(
    db: sqlite3.Connection,
    row_id: int,
    completion_tokens: int,
    finish_reason: str,
    prompt_tokens: int | None,
) -> None:
    cursor = db.execute(
        "UPDATE requests SET completion_tokens = ?, finish_reason = ?, finished_at = ?, "
        "prompt_tokens = COALESCE(?, prompt_tokens) WHERE id = ?",
        (completion_tokens, finish_reason, time.time(), prompt_tokens, row_id),
    )
    if cursor.rowcount == 0:
        raise KeyError(f"no request row {row_id}")
