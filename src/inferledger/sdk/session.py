"""A paid session with one host: chat, stream, close.

The WebSocket runs on the SDK's own event loop (:mod:`inferledger.sdk.portal`), so
the async methods (``chat``, ``stream``, ``aclose``) and their sync twins
(``chat_sync``, ``stream_sync``, ``close``) share one implementation, and the exit
and signal handlers can close a session whatever the program was doing.

Closing asks the node to settle before anything is read from the chain, so a chain
outage cannot keep the node from being asked; the node reports ``settled`` after its
transaction, perhaps after ``settlement_pending`` frames while it is held up. If the
node gives up, is gone, or the time runs out, the depositor asks the chain to close
instead, so the deposit never waits on a node (R1); ``refresh`` learns a settlement
that lands later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import secrets
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import websockets
from eth_account import Account

from inferledger.chain.units import cost
from inferledger.protocol.client import prompt_token_bound
from inferledger.protocol.server import Settled
from inferledger.sdk import lifecycle
from inferledger.sdk import settlement as settle
from inferledger.sdk.errors import ConnectionLost, NodeUnreachable, SessionClosed
from inferledger.sdk.models import SessionStatus, Settlement
from inferledger.sdk.portal import Job, portal
from inferledger.sdk.records import ReceiptRecord, RecordStore, ReplyRecord, SessionRecord
from inferledger.sdk.wire import (
    Expectation,
    History,
    PendingHook,
    Reply,
    SessionClient,
    SessionError,
    SignedReceipt,
)

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

    from inferledger.sdk.client import Client

Messages = Sequence[dict[str, str]]
log = logging.getLogger("inferledger.sdk")
_T = TypeVar("_T")

# Seconds close() waits for the node's `settled` frame: a node's settlement_wait (30 s by
# default) plus a chain outage of a minute or so and the node's retry backoff.
SETTLE_TIMEOUT = 120.0
CONNECT_TIMEOUT = 10.0
CHAIN_LAG = 5.0  # seconds an RPC endpoint may lag behind the node's settlement transaction
BUSY_RETRY_SECONDS = 3.0  # a dropped connection may still look live to the node briefly
_DONE = object()
# What the SDK says when it refuses a node's claim (inferledger.sdk.wire): the connection
# is dropped, so nothing the node said on it is trusted further.
REFUSALS = frozenset({"RECEIPT_REFUSED", "TRANSCRIPT_MISMATCH", "PROTOCOL"})


@dataclass(frozen=True)
class NodeWord:
    """What the node said to ``end``: its ``settled`` frame (still to be checked against the
    chain) or None, and ``why``: why there is none, or what the settlement waited for."""

    settled: Settled | None
    why: str


class Session:
    """An open session; made by ``client.sessions.open`` or ``client.sessions.resume``.

    Use it as a context manager (``with`` or ``async with``) to close it on exit; open
    sessions are also closed at interpreter exit and on SIGINT/SIGTERM (unless resumed
    with ``auto_close=False``). Messages are chat messages, ``{"role": "user",
    "content": "..."}``; ``params`` are generation parameters (``max_tokens``,
    ``temperature``, ``top_p``, ``seed``, ``stop``).
    """

    def __init__(
        self, client: Client, record: SessionRecord, store: RecordStore, *, auto_close: bool = True
    ) -> None:
        self._client = client
        self.record = record
        self._store = store
        self._portal = portal()
        self._wire: SessionClient | None = None
        self._guard: asyncio.Lock | None = None
        self._busy: Job[Any] | None = None
        self._closing = False
        self._node_closing = False  # the node stopped the session (close request, expiry)
        self._resumed_base: tuple[list[int], str] | None = None
        # The reply awaiting its reply_start, with the input count before its prompt.
        self._unbilled_prompt: tuple[ReplyRecord, int] | None = None
        self.last_reply: Reply | None = None
        self.connections = 0
        self.settlement: Settlement | None = (
            Settlement(**record.settlement) if record.settlement else None
        )
        if self.settlement is None and auto_close:
            lifecycle.register(self)

    def __repr__(self) -> str:
        state = self.settlement.status if self.settlement else "open"
        return (
            f"<Session {self.id} {state} input_tokens={self.input_tokens} tokens={self.tokens} "
            f"host={self.host}>"
        )

    # Facts -------------------------------------------------------------------------

    @property
    def id(self) -> int:
        return self.record.session_id

    @property
    def host(self) -> str:
        return self.record.host

    @property
    def model_id(self) -> bytes:
        return bytes.fromhex(self.record.model_id[2:])

    @property
    def url(self) -> str:
        """The node's session WebSocket."""
        return self.record.node_url

    @property
    def signer(self) -> str:
        """Address of this session's own signing key (not the depositor's)."""
        account: LocalAccount = Account.from_key(self.record.signer_key.get_secret_value())
        return account.address

    @property
    def deposit(self) -> int:
        return self.record.deposit

    @property
    def input_price_per_mtok(self) -> int:
        return self.record.input_price_per_mtok

    @property
    def output_price_per_mtok(self) -> int:
        return self.record.output_price_per_mtok

    @property
    def tokens(self) -> int:
        """Output tokens received so far."""
        return self.record.tokens

    @property
    def input_tokens(self) -> int:
        """Prompt tokens billed so far."""
        return self.record.input_tokens

    @property
    def cost(self) -> int:
        """What the tokens so far cost (prompts and replies), in base units."""
        return cost(
            self.input_tokens, self.tokens, self.input_price_per_mtok, self.output_price_per_mtok
        )

    @property
    def record_path(self) -> Path:
        return self._store.path_of(self.record)

    @property
    def closed(self) -> bool:
        """Settled, or closing on chain: either way the session takes no more prompts."""
        return self.settlement is not None

    def status(self) -> SessionStatus:
        """The session as the chain sees it now."""
        return settle.status(self._client.contracts, self.id, self.record.created_block)

    # Chat --------------------------------------------------------------------------

    async def chat(self, messages: Messages, **params: Any) -> Reply:
        """Send ``messages`` and return the whole reply; receipts are signed on the way."""
        job = self._start(self._reply(messages, params, None))
        try:
            return await asyncio.wrap_future(job.future)
        finally:
            if not job.done():
                await job.acancel()

    async def stream(self, messages: Messages, **params: Any) -> AsyncGenerator[str, None]:
        """Send ``messages`` and yield the reply's text token by token.

        The finished reply is in ``last_reply`` afterwards. Stopping early drops the
        connection (the node may have streamed ahead); the next call resumes.
        """
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[Any] = asyncio.Queue()

        def push(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the caller's loop is gone
                loop.call_soon_threadsafe(items.put_nowait, item)

        job = self._start(self._reply(messages, params, push))
        finished = False
        try:
            while (item := await items.get()) is not _DONE:
                yield item
            finished = True
        finally:
            if not finished:
                await job.acancel()
        await asyncio.wrap_future(job.future)  # raises what the reply raised

    def chat_sync(self, messages: Messages, **params: Any) -> Reply:
        """``chat`` for programs without an event loop."""
        job = self._start(self._reply(messages, params, None))
        try:
            return job.result()
        finally:
            if not job.done():
                job.cancel()

    def stream_sync(self, messages: Messages, **params: Any) -> Iterator[str]:
        """``stream`` for programs without an event loop."""
        items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        job = self._start(self._reply(messages, params, items.put))
        try:
            while (item := items.get()) is not _DONE:
                yield item
            job.result()
        finally:
            if not job.done():
                job.cancel()

    def disconnect(self) -> None:
        """Drop the connection without ending the session; the next call reconnects."""
        self._cancel_busy()
        self._portal.run(self._drop())

    def detach(self) -> None:
        """Disconnect and stop closing this session automatically at exit.

        For handing the session to another process, which resumes it from its record
        (``client.sessions.resume(session_id)``).
        """
        self.disconnect()
        lifecycle.unregister(self)

    # Close -------------------------------------------------------------------------

    def close(
        self, timeout: float = SETTLE_TIMEOUT, *, on_pending: PendingHook | None = None
    ) -> Settlement:
        """End the session and return how it settled, as the chain confirms it.

        The node is asked first, without reading the chain before (an RPC outage must not
        keep the node from being asked): ``end``, then up to ``timeout`` seconds for its
        ``settled`` frame, through any ``settlement_pending`` frames (each passed to
        ``on_pending``) while its transaction is held up. The frame counts only once
        ``get_session`` agrees, read (and retried) within what is left of ``timeout``. If
        the node gives up, is unreachable, or the time runs out, the chain is read: a
        settled session is reported from its settlement log; an open one gets a
        ``request_close`` from the depositor and comes back with status "closing" (call
        ``finalize()`` after ``finalize_after``; ``refresh()`` learns a later settlement).
        A session closing already is only refreshed from the chain.
        """
        if self.settlement is not None:  # settled, or closing on chain: the chain says more
            self.refresh()
            return self.settlement
        self._closing = True
        try:
            self._cancel_busy()
            deadline = time.monotonic() + timeout
            word = self._portal.run(self._end_on_node(timeout, on_pending))
            return self._conclude(word, deadline)
        finally:
            self._closing = False

    async def aclose(
        self, timeout: float = SETTLE_TIMEOUT, *, on_pending: PendingHook | None = None
    ) -> Settlement:
        """``close`` for async callers."""
        return await asyncio.to_thread(self.close, timeout, on_pending=on_pending)

    def refresh(self) -> Settlement | None:
        """Re-read the chain for a session not recorded as settled, and record its settlement
        once the chain shows one: a node may settle after ``close()`` returned "closing".
        Returns the settlement as recorded now (None while the session is open)."""
        learned = settle.settled_since(self._client.contracts, self.record)
        return self._finish(learned) if learned is not None else self.settlement

    def finalize(self) -> Settlement:
        """Settle at the last checkpoint once the close window has passed (anyone may)."""
        return self._finish(
            settle.finalize(self._client, self.id, from_block=self.record.created_block)
        )

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self.closed:
            self.close()

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if not self.closed:
            await self.aclose()

    # Portal side: everything below runs on the SDK's event loop ----------------------

    def _start(self, coro: Coroutine[Any, Any, _T]) -> Job[_T]:
        job = self._portal.start(coro)
        self._busy = job
        return job

    def _cancel_busy(self) -> None:
        busy = self._busy
        if busy is not None and not busy.done():
            busy.cancel()

    def _lock(self) -> asyncio.Lock:
        if self._guard is None:
            self._guard = asyncio.Lock()
        return self._guard

    async def _reply(
        self, messages: Messages, params: dict[str, Any], push: Callable[[Any], None] | None
    ) -> Reply:
        try:
            async with self._lock():
                if self._node_closing:
                    raise SessionClosed(
                        f"the node stopped session {self.id} (a close request, or its expiry "
                        "is near) and is settling it; close() reports the settlement"
                    )
                if self.closed:
                    raise SessionClosed(
                        f"session {self.id} is {self.settlement.status if self.settlement else ''}"
                        "; open a new one"
                    )
                try:
                    return await self._stream_reply(messages, params, push)
                except SessionError as exc:
                    if exc.code not in ("SESSION_CLOSING", "SESSION_CLOSED"):
                        raise
                    self._node_closing = True  # no prompt will be taken again
                    raise SessionClosed(
                        f"{exc.code}: the node is settling session {self.id} or has settled "
                        f"it ({exc.message}); close() reports the settlement"
                    ) from exc
        finally:
            if push is not None:
                push(_DONE)

    async def _stream_reply(
        self, messages: Messages, params: dict[str, Any], push: Callable[[Any], None] | None
    ) -> Reply:
        wire = await self._connected()
        if params.get("seed") is None:
            # Ours, not the host's: a sampled reply is checkable against it (and the host
            # cannot grind seeds for text it prefers). Kept in the record for verification.
            params = {**params, "seed": secrets.randbits(63)}
        self.record.request_seq += 1
        entry = ReplyRecord(
            request_id=f"r{self.record.request_seq}",
            messages=[dict(m) for m in messages],
            params=dict(params),
            first_token=wire.received,
        )
        self.record.replies.append(entry)
        self._unbilled_prompt = (entry, wire.input_tokens)
        try:
            async for token in wire.stream(messages, request_id=entry.request_id, **params):
                if push is not None:
                    push(token.text)
        except asyncio.CancelledError:
            self._sync_last_reply()
            if not self._closing:
                await self._drop()  # abandoned mid-reply: resynchronise by reconnecting
            self._save()
            raise
        except (websockets.ConnectionClosed, OSError) as exc:
            self._sync_last_reply()
            await self._drop()
            self._save()
            raise ConnectionLost(
                f"connection to {self.url} lost after {len(entry.token_ids)} tokens of this "
                "reply; the next call reconnects and resumes from the node's last receipt"
            ) from exc
        except SessionError as exc:
            self._sync_last_reply()
            if not entry.token_ids and entry.prompt_tokens is None:
                self.record.replies.remove(entry)  # refused before anything was billed
            if not wire.is_open or exc.code in REFUSALS:
                await self._drop()  # the node broke the protocol: start afresh next time
            self._save()
            raise
        self._sync_last_reply()
        done = wire.last_done
        entry.finish_reason = done.finish_reason if done else None
        self._save()
        reply = Reply(
            text=entry.text,
            token_ids=list(entry.token_ids),
            finish_reason=entry.finish_reason or "",
            prompt_tokens=done.prompt_tokens if done else 0,
            session_tokens=wire.received,
            input_tokens=wire.input_tokens,
            cost=wire.session_cost(),
        )
        if done is not None and done.finish_reason == "closing":
            self._node_closing = True
        self.last_reply = reply
        return reply

    async def _connected(self) -> SessionClient:
        """The live connection, reconnecting (and resuming from the node's last receipt)."""
        if self._wire is not None and self._wire.is_open:
            return self._wire
        await self._drop()
        deadline = time.monotonic() + BUSY_RETRY_SECONDS
        record = self.record
        last = record.replies[-1] if record.replies else None
        reply_open = last is not None and last.finish_reason is None
        history = History(
            token_ids=tuple(record.token_ids()),
            input_tokens=record.input_tokens,
            signed=record.signed_counts(),
            reply_open=reply_open,
            unconfirmed_prompt_bound=(
                prompt_token_bound(last.messages)
                if last is not None and reply_open and last.prompt_tokens is None
                else 0
            ),
        )
        expect = Expectation(self._client.contracts.marketplace.domain(), record.host)
        while True:
            try:
                wire = await SessionClient.connect(
                    self.url,
                    self.id,
                    record.signer_key.get_secret_value(),
                    expect=expect,
                    history=history,
                    on_receipt=self._on_receipt,
                    open_timeout=CONNECT_TIMEOUT,
                    plaintext=self._client.plaintext_sessions,
                )
                break
            except SessionError as exc:
                if exc.code != "SESSION_BUSY" or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                raise NodeUnreachable(
                    f"cannot reach the node at {self.url}: {exc.__class__.__name__}: {exc}"
                ) from exc
        if record.tokens > wire.received:
            # Tokens the node no longer holds (it lost them in a crash): never billed.
            record.truncate(wire.received)
        if last is not None and reply_open and last.prompt_tokens is None:
            grown = wire.input_tokens - record.input_tokens
            last.prompt_tokens = grown if grown > 0 else None
        record.input_tokens = wire.input_tokens
        self._wire = wire
        self._resumed_base = (list(last.token_ids), last.text) if last is not None else None
        self._sync_last_reply()  # tokens the node replayed join the reply they belong to
        self._save()
        self.connections += 1
        await wire.settle_up()
        return wire

    async def _drop(self) -> None:
        self._unbilled_prompt = None
        wire, self._wire = self._wire, None
        if wire is not None:
            with contextlib.suppress(Exception):
                await wire.close()

    def _on_receipt(self, receipt: SignedReceipt) -> None:
        """Called before a signed receipt is sent: the record on disk covers it first."""
        self._sync_last_reply()
        self.record.receipts.append(
            ReceiptRecord(
                input_tokens=receipt.input_tokens,
                tokens=receipt.tokens,
                proof_hash="0x" + receipt.proof_hash.hex(),
                transcript_hash="0x" + receipt.transcript_hash.hex(),
                proof_uri=receipt.proof_uri,
                signature="0x" + receipt.signature.hex(),
            )
        )
        self._save()

    def _sync_last_reply(self) -> None:
        """Copy the tokens of the reply on this connection from the wire into the record
        (the wire also counts tokens that arrive after ``end`` stopped a reply), and the
        input tokens accepted: the prompt's count once its ``reply_start`` arrived."""
        wire = self._wire
        if wire is None or not self.record.replies:
            return
        self.record.input_tokens = wire.input_tokens
        pending = self._unbilled_prompt
        if pending is not None and wire.prompt_bound == 0:  # its reply_start was accepted
            entry, before = pending
            entry.prompt_tokens = wire.input_tokens - before
            self._unbilled_prompt = None
        last = self.record.replies[-1]
        offset = last.first_token - wire.start_tokens
        if offset < 0:
            # A reply resumed on this connection: what earlier ones got, plus the replay.
            kept = self._resumed_base or ([], "")
            tokens = wire.tokens
            last.token_ids = kept[0] + [t.token_id for t in tokens]
            last.text = kept[1] + "".join(t.text for t in tokens)
            return
        tokens = wire.tokens[offset:]
        last.token_ids = [t.token_id for t in tokens]
        last.text = "".join(t.text for t in tokens)

    def _save(self) -> None:
        self._store.save(self.record)

    async def _end_on_node(self, timeout: float, on_pending: PendingHook | None) -> NodeWord:
        """Ask the node to end and settle, and hear it out until its final word."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self._lock():
            try:
                if self._node_closing and self._wire is not None:
                    wire = self._wire  # the node is already ending it: hear it out
                else:
                    wire = await self._connected()
            except NodeUnreachable as exc:
                return NodeWord(None, f"could not reach the node ({exc})")
            except Exception as exc:  # refused (SESSION_CLOSED, ...) or broken
                return NodeWord(None, f"the node did not take the session back ({exc})")
            try:
                await asyncio.wait_for(wire.end(), max(deadline - loop.time(), 0.1))
            except Exception as exc:
                self._sync_last_reply()
                self._save()
                await self._drop()
                why = f"the node did not end the session ({exc.__class__.__name__}: {exc})"
                return NodeWord(None, why)
            self._sync_last_reply()
            self._save()
            try:
                final = await wire.wait_settlement(max(deadline - loop.time(), 0.1), on_pending)
            except Exception as exc:
                return NodeWord(None, f"the node did not report a settlement ({exc})")
            finally:
                open_at_end = wire.is_open
                await self._drop()
        waited = "; ".join(dict.fromkeys(frame.reason for frame in wire.pending))
        if isinstance(final, Settled):
            return NodeWord(final, waited and f"the node's settlement was pending ({waited})")
        if wire.node_gave_up:
            return NodeWord(None, wire.pending[-1].reason)
        stopped = f"no word after {timeout:g}s" if open_at_end else "the node closed the connection"
        if waited:
            return NodeWord(None, f"the node's settlement is still pending ({waited}; {stopped})")
        return NodeWord(None, f"the node reported no settlement ({stopped})")

    # Caller side: chain reads and writes --------------------------------------------

    def _conclude(self, word: NodeWord, deadline: float) -> Settlement:
        """Check the node's word against the chain, or fall back to the chain (R1)."""
        # Chain reads are retried until the deadline, and a few seconds past it: the node's
        # transaction may be mined a moment before a lagging RPC endpoint shows it.
        until = max(deadline, time.monotonic() + CHAIN_LAG)
        why = word.why
        if word.settled is not None:
            info = settle.read_session(self._client.contracts, self.id, until=until, settled=True)
            if settle.frame_matches_chain(word.settled, info):
                return self._finish(settle.from_frame(word.settled, message=why))
            log.warning(
                "session %s: the node's settled frame (%s) is not what the chain shows; "
                "the chain's word is reported instead",
                self.id,
                word.settled.model_dump_json(),
            )
            why = "the node reported a settlement the chain does not show"
        return self._finish(
            settle.request_close(
                self._client,
                self.id,
                reason=why,
                from_block=self.record.created_block,
                until=until,
            )
        )

    def _finish(self, settlement: Settlement) -> Settlement:
        self.settlement = settlement
        self.record.settlement = settlement.as_dict()
        self._save()
        lifecycle.unregister(self)
        return settlement
