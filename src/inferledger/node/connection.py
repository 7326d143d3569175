"""One client connection: login, prompts, metered streaming and the receipt window.

The reader loop parses every inbound frame and answers bad ones with an error frame; a
reply streams in its own task, so receipts keep arriving while tokens flow. The backend's
events are pulled in the generation pool while the reply holds a generation slot, each call
returning the tokens computed within ``_BATCH_SECONDS`` (never more than may be sent now),
and the tokens served but not yet sent go out together in one frame at the next write; a
reply waiting for its receipt gives the slot back, so a client that stops signing pauses
only its own stream (and, after the receipt timeout, loses the connection).

What all connections share, so that no one client can take it all, is the node's
:class:`Gate`: live sockets in total and per address, replies in flight per depositor.

What may be served and what must be receipted is decided by the session's
:class:`~inferledger.node.metering.Meter`, which the node keeps across connections; this
module only moves frames and tokens according to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Mapping
from concurrent.futures import Executor
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from inferledger.chain.contracts import SessionInfo
from inferledger.chain.errors import ChainError
from inferledger.chain.receipts import (
    InvalidSignature,
    Receipt,
    SessionAuth,
    check_receipt_signature,
    recover_session_auth_signer,
)
from inferledger.chain.redact import CHAIN_UNAVAILABLE
from inferledger.config import Settings
from inferledger.inference.base import (
    Backend,
    Event,
    Finish,
    GenerationParams,
    Hidden,
    Message,
    Token,
)
from inferledger.node.checkpoints import (
    CheckpointJob,
    ReplyTrace,
    build_checkpoint,
    prompt_token_ids,
)
from inferledger.node.metering import (
    Counts,
    Meter,
    MeterRefusal,
    Phase,
    ReceiptRequest,
    settle_lead,
)
from inferledger.node.node import Node
from inferledger.node.outbox import CheckpointRecord, SettlementReason, SettlementRecord
from inferledger.node.settlement import proof_uri
from inferledger.node.state import session_record
from inferledger.proofs.sampling import Sampling
from inferledger.proofs.transcript import TranscriptHash
from inferledger.protocol.channel import Channel, KeyPair, SealBroken, agree_channel
from inferledger.protocol.client import (
    End,
    KeyShare,
    Ping,
    Prompt,
    ReceiptFrame,
    SessionInit,
    parse_client_frame,
)
from inferledger.protocol.codes import PROTOCOL_VERSION, ErrorCode, ProtocolError
from inferledger.protocol.server import (
    SETTLEMENT_GAVE_UP,
    Challenge,
    Done,
    ErrorFrame,
    Pong,
    ReceiptAck,
    ReplayedToken,
    ReplyStart,
    SessionEnd,
    SessionReady,
    Settled,
    SettlementPending,
    _NodeFrame,
    dump_json,
    token_frame_json,
)
from inferledger.protocol.server import ReceiptRequest as ReceiptRequestFrame

log = logging.getLogger("inferledger.node")

_END = object()
_BATCH_SECONDS = 0.002  # a generation step returns the tokens computed within this long
_TRY_AGAIN_LATER = 1013  # WebSocket close code: the node is at a connection limit
_NO_BUNDLE = bytes(32)  # the proof hash a receipt names before the session's first bundle


def _refused(refusal: MeterRefusal) -> ProtocolError:
    return ProtocolError(ErrorCode(refusal.code), refusal.message)


@dataclasses.dataclass
class Gate:
    """The node's shared limits, counted on the event loop (no locks needed): a stranger
    cannot hold every socket, nor a depositor with many sessions every generation slot."""

    max_connections: int
    max_per_address: int
    max_replies: int
    sockets: Counter[str] = dataclasses.field(default_factory=Counter)
    replies: Counter[str] = dataclasses.field(default_factory=Counter)

    @classmethod
    def from_settings(cls, settings: Settings) -> Gate:
        return cls(
            settings.max_connections,
            settings.max_connections_per_ip,
            settings.max_replies_per_depositor,
        )

    def socket(self, address: str) -> contextlib.AbstractContextManager[None]:
        """Count one live socket from ``address`` while the returned block runs; raises at
        once (nothing counted) when the node or the address has no connection left."""
        if self.sockets.total() >= self.max_connections:
            raise ProtocolError(
                ErrorCode.TOO_MANY_CONNECTIONS,
                f"the node has its {self.max_connections} connections; try again later",
            )
        if self.sockets[address] >= self.max_per_address:
            raise ProtocolError(
                ErrorCode.TOO_MANY_CONNECTIONS,
                f"{self.max_per_address} connections from this address already; close one",
            )
        return _counted(self.sockets, address)

    def reply(self, depositor: str) -> contextlib.AbstractContextManager[None]:
        """Count one reply in flight for ``depositor`` while the returned block runs; raises
        at once when the depositor has no reply left."""
        key = depositor.lower()
        if self.replies[key] >= self.max_replies:
            raise ProtocolError(
                ErrorCode.TOO_MANY_REPLIES,
                f"the depositor already has {self.max_replies} replies in flight on this node; "
                "wait for one to finish",
            )
        return _counted(self.replies, key)


@contextlib.contextmanager
def _counted(counter: Counter[str], key: str) -> Iterator[None]:
    counter[key] += 1
    try:
        yield
    finally:
        counter[key] -= 1
        if counter[key] <= 0:
            del counter[key]


def _check_context(backend: Backend, prompt_tokens: int) -> None:
    """Refuse, before it is billed, a prompt that leaves the model no room to reply."""
    context = getattr(backend, "context_length", None)  # backends without one take any length
    if isinstance(context, int) and prompt_tokens >= context:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"prompt is {prompt_tokens} tokens; the model's context holds {context}",
        )


class _Slot:
    """One of the node's generation slots, held by a reply only while it computes tokens."""

    def __init__(self, node: Node) -> None:
        self._slots = node.generation_slots()
        self._queue = node.metrics.generation_queue
        self.held = False

    async def take(self) -> None:
        self._queue.inc()
        try:
            await self._slots.acquire()
        finally:
            self._queue.dec()
        self.held = True

    def give_back(self) -> None:
        if self.held:
            self.held = False
            self._slots.release()


class _Steps:
    """A backend's events, each computed by its own call in the generation pool: between
    calls a reply holds no worker thread, so a paused reply blocks no one."""

    def __init__(
        self, executor: Executor, start: Callable[[], Generator[Event, None, None]]
    ) -> None:
        self._executor = executor
        self._start = start
        self._events: Generator[Event, None, None] | None = None
        self._step: asyncio.Future[Any] | None = None

    def _advance(self, limit: int) -> list[Any]:
        if self._events is None:
            self._events = self._start()
        events: list[Any] = []
        tokens, deadline = 0, time.monotonic() + _BATCH_SECONDS
        while True:
            event = next(self._events, _END)
            events.append(event)
            if event is _END:
                return events
            if isinstance(event, Token):
                tokens += 1
                if tokens >= limit or time.monotonic() >= deadline:
                    return events

    async def next(self, limit: int = 1) -> list[Any]:
        """The next events, up to the ``limit``-th token (fewer if computing them takes over
        ``_BATCH_SECONDS``: a model's token comes alone, a fast backend's come together), the
        last ``_END`` when the backend is done; a backend failure is the client's BAD_REQUEST.
        """
        loop = asyncio.get_running_loop()
        self._step = loop.run_in_executor(self._executor, self._advance, max(1, limit))
        try:
            # Shielded: a cancelled reply leaves the step to finish; ``close`` waits for it.
            return await asyncio.shield(self._step)
        except Exception as exc:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"generation refused: {exc}") from exc

    async def close(self) -> None:
        """Let a step still running end, then close the backend's generator."""
        if self._step is not None:
            with contextlib.suppress(Exception):
                await self._step
        if self._events is not None:
            await asyncio.to_thread(self._events.close)


class Connection:
    def __init__(self, node: Node, websocket: WebSocket, gate: Gate) -> None:
        self.node = node
        self.ws = websocket
        self.gate = gate
        self.nonce = os.urandom(32)
        self.info: SessionInfo | None = None
        self.meter: Meter | None = None
        self.reserved = False  # this connection holds the session's live slot
        self.checkpointed = 0  # output token_end of the last proof bundle
        self.last_bundle = _NO_BUNDLE
        self.transcript: TranscriptHash | None = None  # over every output token served
        self.salt = bytes(32)  # the user's bundle salt, set at login from session_init
        self.trace: ReplyTrace | None = None
        self.checkpoint_due = False
        self._checkpoint_lock = asyncio.Lock()
        self.sent_at: dict[Counts, float] = {}  # when each receipt was asked for
        self._bundles: dict[bytes, CheckpointRecord] = {}  # bundles built on this connection
        self.window = asyncio.Event()  # set whenever a receipt lands or the session stops
        self.request_task: asyncio.Task[None] | None = None
        self.closing_task: asyncio.Task[None] | None = None
        self.close_reason: SettlementReason = "end"
        self.settles_at = 0.0  # wall-clock time at which serving stops (before expiry)
        self.receipt_every = max(1, node.settings.max_unreceipted_tokens // 2)
        self._send_lock = asyncio.Lock()
        self.replying = False  # a reply is being served: it writes again soon
        self._queued: list[bytes] = []  # frames for the next write, after the unsent tokens
        # Tokens served but not yet sent: they go in one frame at the next write.
        self._unsent_request = ""
        self._unsent_from = 0  # index of the first
        self._unsent_ids: list[int] = []
        self._unsent_texts: list[str] = []
        self.keys = KeyPair()  # this connection's ephemeral channel key
        self.channel: Channel | None = None  # set by key_share; None: a plaintext session

    # Frames ------------------------------------------------------------------------

    async def send(self, frame: _NodeFrame) -> None:
        """Send ``frame`` now, in one message with whatever waits to go before it (unsent
        tokens, queued frames): frames keep their order."""
        self.queue(frame)
        async with self._send_lock:
            await self._write_queued()

    def queue(self, frame: _NodeFrame) -> None:
        """Send ``frame`` with the next write: for a frame nobody waits on while a reply
        is streaming (its next tokens carry it)."""
        self._take_tokens()
        self._queued.append(dump_json(frame.dump()))

    def _queue_token(self, request_id: str, index: int, token: Token) -> None:
        if not self._unsent_ids:
            self._unsent_request, self._unsent_from = request_id, index
        self._unsent_ids.append(token.token_id)
        self._unsent_texts.append(token.text)

    async def flush(self) -> None:
        """Send what waits to go (unsent tokens, queued frames), as one message."""
        if self._unsent_ids or self._queued:
            async with self._send_lock:
                await self._write_queued()

    def _take_tokens(self) -> None:
        """Move the unsent tokens, as one frame, to the end of the queue."""
        ids, texts = self._unsent_ids, self._unsent_texts
        if ids:
            self._unsent_ids, self._unsent_texts = [], []
            self.node.metrics.tokens_generated.inc(len(ids))
            self._queued.append(
                token_frame_json(self._unsent_request, self._unsent_from, ids, texts)
            )

    async def _write_queued(self) -> None:
        """Under the send lock (it seals in wire order: the nonce is the position): one
        message, a JSON array when it holds several frames (read in order)."""
        self._take_tokens()
        frames, self._queued = self._queued, []
        if frames:
            await self._write(frames[0] if len(frames) == 1 else _array(frames))

    async def _write(self, data: bytes) -> None:
        if self.ws.application_state == WebSocketState.CONNECTED:
            if self.channel is None:
                await self.ws.send_text(data.decode())
            else:
                await self.ws.send_bytes(self.channel.seal(data))

    async def send_error(self, error: ProtocolError) -> None:
        self.node.metrics.errors.labels(code=error.code.value).inc()
        session = self.info.session_id if self.info else "-"
        log.warning("session %s: %s %s", session, error.code.value, error.message)
        await self.send(ErrorFrame(code=error.code.value, message=error.message))

    # Lifecycle ---------------------------------------------------------------------

    async def run(self) -> None:
        """Admit the socket (or refuse it before any work), then serve it until it ends."""
        address = self.ws.client.host if self.ws.client else "unknown"
        try:
            held = self.gate.socket(address)
        except ProtocolError as refused:
            await self._refuse(refused)
            return
        with held:
            await self._serve()

    async def _refuse(self, refused: ProtocolError) -> None:
        """One error frame and close code 1013 (try again later); counted, not logged, as a
        flood of these is what the limit is for."""
        self.node.metrics.errors.labels(code=refused.code.value).inc()
        with contextlib.suppress(Exception):
            await self.ws.accept()
            await self.ws.send_json(
                ErrorFrame(code=refused.code.value, message=refused.message).dump()
            )
            await self.ws.close(code=_TRY_AGAIN_LATER)

    async def _serve(self) -> None:
        await self.ws.accept()
        self.node.loop = asyncio.get_running_loop()
        node = self.node
        await self.send(
            Challenge(
                protocol=PROTOCOL_VERSION,
                nonce="0x" + self.nonce.hex(),
                host=node.address,
                chain_id=node.contracts.chain.chain_id,
                marketplace=node.contracts.marketplace.address,
                model=node.model_name,
                node_key="0x" + self.keys.public.hex(),
                host_signature="0x" + node.sign_challenge(self.nonce, self.keys.public).hex(),
                plaintext=node.plaintext_sessions,
            )
        )
        try:
            await self._read_loop()
        finally:
            await self._cleanup()

    async def _read_loop(self) -> None:
        max_bytes = self.node.settings.max_frame_bytes
        login_by = asyncio.get_running_loop().time() + self.node.settings.login_timeout
        while True:
            try:
                if self.info is not None:
                    message = await self.ws.receive()
                else:  # until it has logged in, a socket lives only until the login deadline
                    async with asyncio.timeout_at(login_by):
                        message = await self.ws.receive()
            except TimeoutError:
                await self.send_error(
                    ProtocolError(
                        ErrorCode.LOGIN_TIMEOUT,
                        f"no session_init within {self.node.settings.login_timeout:g}s",
                    )
                )
                return
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            try:
                frame = parse_client_frame(self._unseal(message), max_bytes)
                await self._dispatch(frame)
            except ProtocolError as error:
                await self.send_error(error)
                if error.fatal:
                    return
            except WebSocketDisconnect:
                return  # the client left while we answered it (a receipt's ack, say)
            except Exception:
                log.exception("internal error while handling a frame")
                await self.send_error(ProtocolError(ErrorCode.INTERNAL, "internal node error"))
                return

    def _unseal(self, message: Mapping[str, Any]) -> str | bytes:
        """The frame a WebSocket message carries: opened, once the channel is up."""
        text, data = message.get("text"), message.get("bytes")
        raw: str | bytes = text if text is not None else (data or b"")
        if self.channel is None:
            return raw
        try:
            return self.channel.open(raw)
        except SealBroken as exc:
            raise ProtocolError(
                ErrorCode.BAD_SEAL, f"{exc}; reconnect (docs/protocol.md, Encryption)"
            ) from exc

    def _agree(self, frame: KeyShare) -> None:
        """Derive the channel keys from the client's key: every later frame is sealed."""
        if self.channel is not None or self.info is not None:
            raise ProtocolError(ErrorCode.BAD_FRAME, "key_share must be the first frame")
        node = self.node
        try:
            self.channel = agree_channel(
                self.keys,
                bytes.fromhex(frame.client_key[2:]),
                "node",
                chain_id=node.contracts.chain.chain_id,
                marketplace=node.contracts.marketplace.address,
                host=node.address,
                nonce=self.nonce,
            )
        except ValueError as exc:
            raise ProtocolError(
                ErrorCode.BAD_SEAL, f"client_key is not a usable X25519 public key: {exc}"
            ) from exc

    async def _dispatch(self, frame: Any) -> None:
        if isinstance(frame, Ping):
            await self.send(Pong())
            return
        if isinstance(frame, KeyShare):
            self._agree(frame)
            return
        if isinstance(frame, SessionInit):
            if self.info is not None:
                raise ProtocolError(ErrorCode.ALREADY_AUTHENTICATED, "session_init sent twice")
            if self.channel is None and not self.node.plaintext_sessions:
                raise ProtocolError(
                    ErrorCode.ENCRYPTION_REQUIRED,
                    "this node takes only encrypted sessions: send key_share before "
                    "session_init (docs/protocol.md, Encryption)",
                )
            await self._login(frame)
            return
        if self.info is None or self.meter is None:
            raise ProtocolError(
                ErrorCode.NOT_AUTHENTICATED, f"send session_init before {frame.type}"
            )
        if isinstance(frame, Prompt):
            if self.request_task is not None and not self.request_task.done():
                raise ProtocolError(
                    ErrorCode.REQUEST_IN_PROGRESS,
                    "a reply is still streaming; wait for its done frame",
                )
            refusal = self.meter.prompt_refusal()
            if refusal is not None:
                raise _refused(refusal)
            self.request_task = asyncio.create_task(self._serve_prompt(frame))
            return
        if isinstance(frame, ReceiptFrame):
            await self._accept_receipt(frame)
            return
        if isinstance(frame, End):
            self.stop_for_settlement("end")
            return
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unhandled frame {frame.type}")

    async def _cleanup(self) -> None:
        if self.request_task is not None and not self.request_task.done():
            self.request_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.request_task
        if self.closing_task is not None and not self.closing_task.done():
            self.closing_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.closing_task
        if self.reserved:
            assert self.info is not None
            try:
                if self.meter is not None:
                    await self._leave(self.info.session_id, self.meter)
            finally:
                self._release()
        if self.ws.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close()

    async def _leave(self, sid: int, meter: Meter) -> None:
        """The connection is gone: prove what it streamed, record it, and decide when to settle."""
        meter.end_reply()
        if meter.phase in (Phase.CLOSING, Phase.CLOSED):
            meter.close()
            await self._settle_now(sid, self.close_reason)
            return
        if self.trace is not None and meter.served.output > self.checkpointed:
            with contextlib.suppress(Exception):
                await self._prove()  # every streamed token ends up in some bundle
        if not meter.settled_up:
            meter.abandoned += 1
        await asyncio.to_thread(
            self.node.state.record_served, sid, meter.served, meter.tail, meter.abandoned
        )
        if meter.abandoned > self.node.settings.max_unpaid_resumes:
            meter.close()
            log.warning(
                "session %s: left owing a receipt %s times; settling at what was receipted",
                sid,
                meter.abandoned,
            )
            await self._settle_now(sid, "unpaid")
            return
        # Left without `end`: settle after a grace period unless the client returns.
        due = time.time() + self.node.settings.disconnect_grace
        await asyncio.to_thread(self.node.outbox.schedule_settlement, sid, "disconnect", due)
        log.info(
            "session %s: client left without end; settlement in %.0fs unless it returns",
            sid,
            self.node.settings.disconnect_grace,
        )

    async def _settle_now(self, sid: int, reason: SettlementReason) -> None:
        await asyncio.to_thread(self.node.outbox.schedule_settlement, sid, reason, time.time())
        self.node.settlement.wake()

    # Login -------------------------------------------------------------------------

    async def _login(self, frame: SessionInit) -> None:
        node = self.node
        if not node.ready:
            raise ProtocolError(
                ErrorCode.NODE_NOT_READY,
                "node is degraded and takes no paid sessions: "
                + "; ".join(r.line() for r in node.preflight.results if not r.ok),
            )
        if bytes.fromhex(frame.nonce[2:]) != self.nonce:
            raise ProtocolError(ErrorCode.BAD_NONCE, "nonce does not match this connection's")
        market = node.contracts.marketplace
        try:
            info = await asyncio.to_thread(market.get_session, frame.session_id)
            chain_now = await asyncio.to_thread(node.contracts.chain.now)
        except ChainError as exc:
            # Before the signature check: a stranger hears that, not why.
            raise ProtocolError(ErrorCode.CHAIN_UNAVAILABLE, f"{CHAIN_UNAVAILABLE}; retry") from exc
        lead = self._check_session(frame.session_id, info, chain_now)
        auth = SessionAuth(frame.session_id, self.nonce, node.address)
        signature = bytes.fromhex(frame.signature[2:])
        try:
            signer = recover_session_auth_signer(node.domain, auth, signature)
        except Exception as exc:
            raise ProtocolError(
                ErrorCode.BAD_SIGNATURE, f"signature does not recover: {exc}"
            ) from exc
        if signer.lower() != info.signer.lower():
            raise ProtocolError(
                ErrorCode.BAD_SIGNATURE,
                f"session_init signed by {signer}, not the session signer {info.signer}",
            )
        sid = info.session_id
        # Check and reserve with no await in between: two logins racing get one slot.
        if sid in node.live:
            raise ProtocolError(
                ErrorCode.SESSION_BUSY,
                f"session {sid} already has a live connection; close it first",
            )
        node.live[sid] = self.stop_for_settlement
        self.reserved = True
        self.info = info
        node.metrics.sessions_active.inc()
        record = await asyncio.to_thread(node.state.upsert_session, session_record(info))
        settlement = await asyncio.to_thread(node.outbox.settlement, sid)
        if settlement is not None and not await asyncio.to_thread(
            node.outbox.cancel_disconnect_settlement, sid
        ):
            self._release()
            raise ProtocolError(
                ErrorCode.SESSION_CLOSED,
                f"session {sid} is being settled ({settlement.reason}); open a new session",
            )
        meter = node.meter_for(record)
        if meter.phase in (Phase.CLOSING, Phase.CLOSED):
            self._release()
            raise ProtocolError(
                ErrorCode.SESSION_CLOSED, f"session {sid} is being settled; open a new session"
            )
        self.meter = meter
        self.salt = bytes.fromhex(frame.salt[2:])
        self.transcript = TranscriptHash(sid, record.last_transcript_hash)
        receipted_hash = self.transcript.value
        for token in meter.tail:
            self.transcript.update(token.token_id)
        self.checkpointed = meter.served.output
        latest = await asyncio.to_thread(node.outbox.checkpoints, sid)
        if latest:
            self.last_bundle = latest[-1].proof_hash
        self.settles_at = time.time() + (info.expires_at - lead - chain_now)
        log.info(
            "session %s: logged in (receipted %s/%s, served %s/%s input/output tokens)",
            sid,
            meter.receipted.input,
            meter.receipted.output,
            meter.served.input,
            meter.served.output,
        )
        await self.send(
            SessionReady(
                session_id=sid,
                model=node.model_name,
                deposit=info.deposit,
                input_price_per_mtok=info.input_price_per_mtok,
                output_price_per_mtok=info.output_price_per_mtok,
                proof_interval=info.proof_interval,
                max_unreceipted_tokens=meter.max_unreceipted,
                receipted_input_tokens=meter.receipted.input,
                receipted_output_tokens=meter.receipted.output,
                served_input_tokens=meter.served.input,
                served_output_tokens=meter.served.output,
                transcript_hash="0x" + receipted_hash.hex(),
                replay=[
                    ReplayedToken(index=t.index, token_id=t.token_id, text=t.text)
                    for t in meter.tail
                ],
                expires_at=info.expires_at,
                settles_at=info.expires_at - lead,
            )
        )
        if not meter.settled_up:
            # Resumed owing a receipt: nothing more is served until it is signed.
            asked = meter.pending[-1] if meter.pending else None
            if asked is not None and asked.counts == meter.served:
                # Asked on a connection that left before signing: ask again, the same way
                # (``_ask_receipt`` would skip it as already asked).
                self.sent_at[asked.counts] = time.monotonic()
                await self._send_request(asked)
            else:
                await self._ask_receipt(self.last_bundle)

    def _check_session(self, session_id: int, info: SessionInfo, chain_now: int) -> int:
        """Refuse a session this node may not serve now; else its settle lead (seconds)."""
        node = self.node
        if not info.exists:
            raise ProtocolError(ErrorCode.SESSION_NOT_FOUND, f"session {session_id} does not exist")
        if info.host.lower() != node.address.lower():
            raise ProtocolError(
                ErrorCode.WRONG_HOST,
                f"session {session_id} belongs to host {info.host}, not {node.address}",
            )
        if not info.is_open:
            raise ProtocolError(
                ErrorCode.SESSION_CLOSED, f"session {session_id} is already settled"
            )
        if info.close_requested_at:
            raise ProtocolError(
                ErrorCode.SESSION_CLOSED, f"the depositor asked to close session {session_id}"
            )
        lead = settle_lead(node.settings.settle_before_expiry, info.expires_at - info.created_at)
        if chain_now >= info.expires_at - lead:
            raise ProtocolError(
                ErrorCode.SESSION_CLOSED,
                f"session {session_id} expires at {info.expires_at} and is being settled",
            )
        if info.model_id != node.model_id:
            raise ProtocolError(
                ErrorCode.MODEL_NOT_SERVED,
                f"session is for model 0x{info.model_id.hex()}; this node serves "
                f"{node.model_name} (0x{node.model_id.hex()})",
            )
        return lead

    def _release(self) -> None:
        """Give the session's live slot back, if this connection holds it."""
        if not self.reserved:
            return
        assert self.info is not None
        if self.node.live.get(self.info.session_id) == self.stop_for_settlement:
            del self.node.live[self.info.session_id]
        self.node.metrics.sessions_active.dec()
        self.reserved = False

    # Streaming ---------------------------------------------------------------------

    async def _serve_prompt(self, prompt: Prompt) -> None:
        assert self.info is not None
        self.replying = True
        try:
            with self.gate.reply(self.info.depositor):
                await self._stream(prompt)
        except ProtocolError as error:
            await self.send_error(error)
            if error.fatal:
                with contextlib.suppress(Exception):
                    await self.ws.close()
        except asyncio.CancelledError:
            raise
        except WebSocketDisconnect:
            pass  # the client left mid-reply; the reader sees it and cleans up
        except Exception:
            log.exception("generation failed")
            await self.send_error(ProtocolError(ErrorCode.INTERNAL, "generation failed"))
        finally:
            self.replying = False
            if self.meter is not None:
                self.meter.end_reply()
            with contextlib.suppress(Exception):
                await self.flush()  # a receipt_ack queued while the reply ended

    async def _stream(self, prompt: Prompt) -> None:
        assert self.info is not None and self.transcript is not None and self.meter is not None
        node, meter = self.node, self.meter
        if time.time() >= self.settles_at:
            raise ProtocolError(
                ErrorCode.SESSION_CLOSING, "the session's max duration is nearly over"
            )
        messages = [Message(role=m.role, content=m.content) for m in prompt.messages]
        capture = node.prover.needs_hidden_states and node.backend.supports_hidden_states
        try:
            prompt_ids = await asyncio.to_thread(prompt_token_ids, node.backend, messages)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.BAD_REQUEST, str(exc)) from exc
        _check_context(node.backend, len(prompt_ids))
        try:
            params = GenerationParams(
                max_tokens=prompt.max_tokens or 1,
                temperature=prompt.temperature,
                top_p=prompt.top_p,
                seed=prompt.seed,
                stop=tuple(prompt.stop),
                repetition_penalty=prompt.repetition_penalty,
            )
        except (ValueError, TypeError) as exc:
            raise ProtocolError(ErrorCode.BAD_REQUEST, str(exc)) from exc
        try:
            meter.start_reply(len(prompt_ids))  # the prompt is billed from here on
        except MeterRefusal as refusal:
            raise _refused(refusal) from None
        left = meter.output_left()  # at least 1: start_reply checked it
        params = dataclasses.replace(params, max_tokens=min(prompt.max_tokens or left, left))
        sampling = Sampling(
            temperature=params.temperature,
            top_p=params.top_p,
            repetition_penalty=params.repetition_penalty,
            seed=params.seed,
        )
        self.trace = ReplyTrace(prompt_ids, keep_rows=capture, sampling=sampling)
        self.queue(  # with the first tokens
            ReplyStart(
                request_id=prompt.request_id,
                prompt_tokens=len(prompt_ids),
                input_tokens=meter.served.input,
            )
        )
        received = time.monotonic()
        row = await node.state.astart_request(
            self.info.session_id, prompt.request_id, len(prompt_ids)
        )
        count, reason = await self._generate_reply(prompt, messages, params, capture, received)
        meter.end_reply()
        async with self._checkpoint_lock:
            await self._checkpoint_tail()
        await node.state.afinish_request(row, count, reason, None)
        await self.send(
            Done(
                request_id=prompt.request_id,
                finish_reason=reason,
                prompt_tokens=len(prompt_ids),
                completion_tokens=count,
                input_tokens=meter.served.input,
                output_tokens=meter.served.output,
            )
        )

    async def _generate_reply(
        self,
        prompt: Prompt,
        messages: list[Message],
        params: GenerationParams,
        capture: bool,
        received: float,
    ) -> tuple[int, str]:
        """Run the backend and send its tokens as the meter allows; (tokens sent, reason).

        The reply holds a generation slot while it computes and gives it back while it waits
        for a receipt, so clients that never sign cannot keep others from being served."""
        assert self.trace is not None and self.meter is not None
        node, meter = self.node, self.meter
        steps = _Steps(
            node.generation_executor(),
            lambda: node.backend.generate(messages, params, capture_hidden_states=capture),
        )
        slot = _Slot(node)
        count, reason = 0, "length"
        try:
            await slot.take()
            finished = False
            while not finished:
                # As many tokens as may be sent now, computed in one call when they are quick.
                room = min(
                    meter.max_unreceipted - meter.unreceipted_output,
                    meter.output_left(),
                    params.max_tokens - count,
                )
                for event in await steps.next(room):
                    if event is _END:
                        finished = True
                        break
                    if isinstance(event, Finish):
                        reason = event.reason
                        continue
                    if isinstance(event, Hidden):
                        self.trace.add_rows(event)
                        await self._checkpoint_when_ready()
                        continue
                    if meter.waiting_for_receipt():
                        await self.flush()
                        slot.give_back()
                        await self._wait_for_window()
                        await slot.take()
                    stopped = self._stop_reason()
                    if stopped is not None:
                        reason = stopped
                        finished = True
                        break
                    await self._serve_token(prompt.request_id, event)
                    count += 1
                    if count == 1:
                        node.metrics.time_to_first_token.observe(time.monotonic() - received)
                # The reply's last token is receipted with its bundle, not before it.
                if not finished and count < params.max_tokens:
                    await self._ask_if_due()
                await self.flush()  # the tokens of this step go out together
        finally:
            await steps.close()  # before the slot goes: a step may still be computing
            slot.give_back()
        if reason == "length" and meter.output_left() == 0:
            reason = "budget"
        return count, reason

    def _stop_reason(self) -> str | None:
        """Why the next token may not be sent: closing, budget, or None to send it."""
        assert self.meter is not None
        if time.time() >= self.settles_at:
            self.stop_for_settlement("expiry")  # the session's time is up: settle it now
        if self.meter.phase is not Phase.STREAMING:
            return "closing"
        if self.meter.output_left() == 0:
            return "budget"
        return None

    async def _serve_token(self, request_id: str, token: Token) -> None:
        """Count a token as served and queue it (sent with the others ready, at the next
        write); build a checkpoint when one is due."""
        assert self.info is not None and self.transcript is not None and self.trace is not None
        assert self.meter is not None
        index = self.meter.token_sent(token.token_id, token.text)
        self.transcript.update(token.token_id)
        self.trace.add_token(token.token_id)
        self._queue_token(request_id, index, token)
        if index % self.info.proof_interval == 0:
            self.checkpoint_due = True
        if self.checkpoint_due:
            await self._checkpoint_when_ready()

    async def _ask_if_due(self) -> None:
        """At the end of a generation step: ask for a receipt once ``receipt_every`` tokens
        were served since the last request. Per step, not per token: a backend that computes
        one token a step is asked at every ``receipt_every``-th (the client signs while the
        next half window streams), while the tokens of a step computed together go out with
        one request that covers them all, not one per half window sent an instant apart."""
        assert self.meter is not None
        if not self.checkpoint_due and self.meter.receipt_due(self.receipt_every):
            await self._ask_receipt(self.last_bundle)

    async def _wait_for_window(self) -> None:
        """Block while the client owes a receipt for ``max_unreceipted`` tokens."""
        assert self.meter is not None
        while self.meter.waiting_for_receipt():
            self.window.clear()
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
                # (the client leaving) that coincides with the receipt arriving.
                async with asyncio.timeout(self.node.settings.user_receipt_timeout):
                    await self.window.wait()
            except TimeoutError as exc:
                raise ProtocolError(
                    ErrorCode.RECEIPT_TIMEOUT,
                    f"no receipt for {self.meter.served.output} tokens within "
                    f"{self.node.settings.user_receipt_timeout:.0f}s",
                ) from exc

    # Receipts ----------------------------------------------------------------------

    async def _checkpoint_when_ready(self) -> None:
        """Build a due checkpoint once the row of its last token has arrived."""
        assert self.trace is not None
        if self.checkpoint_due and self.trace.rows_ready():
            await self.flush()  # the client gets them while the bundle is built
            async with self._checkpoint_lock:
                self.checkpoint_due = False
                await self._ask_receipt(await self._prove())

    async def _checkpoint_tail(self) -> None:
        """At the end of a reply (or when it stops): a bundle for output tokens not yet
        proved, and a receipt request for everything served."""
        assert self.meter is not None
        self.checkpoint_due = False
        if self.trace is not None and self.meter.served.output > self.checkpointed:
            await self._prove()
        if not self.meter.settled_up:
            await self._ask_receipt(self.last_bundle)

    async def _prove(self) -> bytes:
        """Prove the output tokens since the last bundle and store it; its proof hash."""
        assert self.info is not None and self.transcript is not None and self.trace is not None
        assert self.meter is not None
        job = CheckpointJob(
            session_id=self.info.session_id,
            token_start=self.checkpointed,
            token_end=self.meter.served.output,
            transcript_hash=self.transcript.value,
            segment=self.trace.take_segment(),
            salt=self.salt,
        )
        self.checkpointed = job.token_end
        # Shielded: once proving starts, its checkpoint row is written even if `end` or a
        # disconnect cancels this task meanwhile.
        record = await asyncio.shield(build_checkpoint(self.node, job))
        self.last_bundle = record.proof_hash
        self._bundles[record.proof_hash] = record
        return record.proof_hash

    async def _ask_receipt(self, proof_hash: bytes) -> None:
        """Record what was served, then ask the client to sign it (all of it)."""
        assert self.info is not None and self.transcript is not None and self.meter is not None
        meter = self.meter
        if meter.phase is Phase.CLOSED or meter.requested == meter.served:
            return  # nothing new to sign (asked already, or receipted)
        request = ReceiptRequest(
            meter.served, proof_hash, self.transcript.value, self._bundles.get(proof_hash)
        )
        # The tokens wait for the state write: they go out with the request, in one message.
        await self.node.state.arecord_served(
            self.info.session_id, meter.served, meter.tail, meter.abandoned
        )
        meter.request(request)
        self.sent_at[request.counts] = time.monotonic()
        await self._send_request(request)

    async def _send_request(self, request: ReceiptRequest) -> None:
        assert self.info is not None
        proof_hash = request.proof_hash
        await self.send(
            ReceiptRequestFrame(
                session_id=self.info.session_id,
                input_tokens=request.counts.input,
                output_tokens=request.counts.output,
                proof_hash="0x" + proof_hash.hex(),
                transcript_hash="0x" + request.transcript_hash.hex(),
                proof_uri=proof_uri(proof_hash) if proof_hash != _NO_BUNDLE else None,
            )
        )

    async def _accept_receipt(self, frame: ReceiptFrame) -> None:
        assert self.info is not None and self.meter is not None
        counts = Counts(frame.input_tokens, frame.output_tokens)
        proof_hash = bytes.fromhex(frame.proof_hash[2:])
        try:
            request = self.meter.match(counts, proof_hash)
        except MeterRefusal as refusal:
            raise _refused(refusal) from None
        receipt = Receipt(self.info.session_id, counts.input, counts.output, proof_hash)
        signature = bytes.fromhex(frame.signature[2:])
        try:
            check_receipt_signature(self.node.domain, receipt, signature, self.info.signer)
        except InvalidSignature as exc:
            raise ProtocolError(ErrorCode.RECEIPT_INVALID, str(exc)) from exc
        await self.node.state.astore_receipt(
            receipt.session_id, counts, proof_hash, signature, request.transcript_hash
        )
        self.meter.accept(request)
        self.node.metrics.checkpoints.labels(state="receipted").inc()
        checkpoint = request.checkpoint
        if isinstance(checkpoint, CheckpointRecord) and checkpoint.token_end == counts.output:
            await self._queue_on_chain(checkpoint)
        sent_at = self.sent_at.pop(counts, None)
        self.sent_at = {c: t for c, t in self.sent_at.items() if not counts.covers(c)}
        if sent_at is not None:
            self.node.metrics.receipt_round_trip.observe(time.monotonic() - sent_at)
        log.debug(  # one per receipt: at debug level, so many sessions do not flood the log
            "session %s: checkpoint stored: receipt for %s input / %s output tokens signed "
            "(proof_hash 0x%s)",
            receipt.session_id,
            counts.input,
            counts.output,
            proof_hash.hex(),
        )
        self.window.set()
        ack = ReceiptAck(input_tokens=counts.input, output_tokens=counts.output)
        if self.replying:
            self.queue(ack)  # it goes with the reply's next tokens, or with its done
        else:
            await self.send(ack)

    async def _queue_on_chain(self, checkpoint: CheckpointRecord) -> None:
        """Submit this checkpoint on chain too, if the policy says so (default: never)."""
        policy = self.node.settings.onchain_checkpoints
        if policy == "never" or (policy != "always" and checkpoint.idx % int(policy) != 0):
            return
        await asyncio.to_thread(
            self.node.outbox.set_checkpoint_status,
            checkpoint.session_id,
            checkpoint.token_end,
            "queued",
        )
        self.node.settlement.wake()

    # Closing -----------------------------------------------------------------------

    def stop_for_settlement(self, reason: SettlementReason) -> None:
        """`end`, a close request or the approach of expiry: stop serving, collect the final
        receipt, then settle. Called on the event loop (the worker uses ``Node.request_stop``)."""
        if self.meter is None or self.closing_task is not None:
            return
        self.close_reason = reason
        self.meter.begin_close()
        self.window.set()  # a stream waiting for a receipt stops waiting
        self.closing_task = asyncio.create_task(self._close())

    async def _close(self) -> None:
        assert self.info is not None and self.meter is not None
        meter, sid = self.meter, self.info.session_id
        if self.request_task is not None and not self.request_task.done():
            with contextlib.suppress(Exception):
                await self.request_task  # stops at its next token, proves and asks its tail
        async with self._checkpoint_lock:
            await self._checkpoint_tail()
        deadline = time.monotonic() + self.node.settings.user_receipt_timeout
        while not meter.settled_up and time.monotonic() < deadline:
            self.window.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline - time.monotonic()):
                    await self.window.wait()
        meter.close()
        await self._finish_session(sid)
        with contextlib.suppress(Exception):
            await self.ws.close()

    async def _finish_session(self, sid: int) -> None:
        """Say goodbye, settle on chain, and tell the client what was paid."""
        assert self.meter is not None
        meter = self.meter
        await self.send(
            SessionEnd(
                session_id=sid,
                served_input_tokens=meter.served.input,
                served_output_tokens=meter.served.output,
                receipted_input_tokens=meter.receipted.input,
                receipted_output_tokens=meter.receipted.output,
            )
        )
        await asyncio.to_thread(
            self.node.state.record_served, sid, meter.served, meter.tail, meter.abandoned
        )
        settlement = await self._settled_or_pending(sid)
        if settlement is None or settlement.status != "settled":
            return
        # finish_settlement writes a settled record's amounts together with its status.
        assert settlement.input_tokens is not None and settlement.tokens is not None
        assert settlement.host_amount is not None and settlement.fee is not None
        assert settlement.refund is not None
        await self.send(
            Settled(
                session_id=sid,
                input_tokens=settlement.input_tokens,
                output_tokens=settlement.tokens,
                host_amount=settlement.host_amount,
                fee=settlement.fee,
                refund=settlement.refund,
                refund_credited=settlement.refund_credited,
                tx_hash=settlement.tx_hash,
            )
        )

    async def _settled_or_pending(self, sid: int) -> SettlementRecord | None:
        """Settle now and wait for the worker's word. Past ``settlement_wait`` the client hears
        ``settlement_pending`` with what the settlement waits for, and the connection stays
        open for the outcome until ``settlement_report_timeout``."""
        settings, notices = self.node.settings, self.node.notices
        future = notices.watch(sid)
        try:
            await self._settle_now(sid, self.close_reason)
            outcome = asyncio.wrap_future(future)
            settlement = await _within(outcome, settings.settlement_wait)
            if settlement is None:
                record = await asyncio.to_thread(self.node.outbox.settlement, sid)
                waits = record is not None and record.last_error
                reason = (
                    "the settlement has not landed yet; the node retries"
                    if waits
                    else "the settlement transaction is running"
                )
                await self.send(SettlementPending(session_id=sid, reason=reason))
                left = max(0.0, settings.settlement_report_timeout - settings.settlement_wait)
                settlement = await _within(outcome, left)
        finally:
            notices.forget(sid, future)
        if settlement is not None and settlement.status == "failed":
            # The frame goes to the session's signer only; chain errors carry no URL.
            reason = f"{SETTLEMENT_GAVE_UP} {settlement.last_error}"
            await self.send(SettlementPending(session_id=sid, reason=reason))
        return settlement


def _array(frames: list[bytes]) -> bytes:
    return b"[" + b",".join(frames) + b"]"


async def _within(
    outcome: asyncio.Future[SettlementRecord], seconds: float
) -> SettlementRecord | None:
    """The outcome if it comes within ``seconds`` (the future stays usable after a timeout)."""
    try:
        return await asyncio.wait_for(asyncio.shield(outcome), seconds)
    except TimeoutError:
        return None
