"""One client connection: login, prompts, metered streaming and the receipt window.

The reader loop parses every inbound frame and answers bad ones with an error
frame; a reply streams in its own task, so receipts keep arriving while tokens
flow. Generation runs in a worker thread that hands tokens over a small bounded
queue: a client that stops sending receipts pauses its own stream (and, after
the receipt timeout, loses the connection) without slowing anyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
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
from inferledger.inference.base import Finish, GenerationParams, Hidden, Token
from inferledger.node.checkpoints import (
    CheckpointJob,
    ReplyTrace,
    build_checkpoint,
    prompt_token_ids,
)
from inferledger.node.metering import budget_tokens
from inferledger.node.node import Node
from inferledger.node.outbox import CheckpointRecord
from inferledger.node.protocol import (
    PROTOCOL_VERSION,
    End,
    ErrorCode,
    Ping,
    Prompt,
    ProtocolError,
    ReceiptFrame,
    SessionInit,
    parse_client_frame,
)
from inferledger.node.settlement import proof_uri
from inferledger.node.state import SessionRecord
from inferledger.proofs.transcript import TranscriptHash

log = logging.getLogger("inferledger.node")

_END = object()
_HANDOFF_DEPTH = 8  # tokens a worker may run ahead of what has been sent


class Connection:
    def __init__(self, node: Node, websocket: WebSocket) -> None:
        self.node = node
        self.ws = websocket
        self.nonce = os.urandom(32)
        self.info: SessionInfo | None = None
        self.budget = 0
        self.generated = 0
        self.receipted = 0
        self.checkpointed = 0  # token_end of the last checkpoint built
        self.transcript: TranscriptHash | None = None
        self.trace: ReplyTrace | None = None
        self.checkpoint_due = False
        self._checkpoint_lock = asyncio.Lock()
        # tokens -> (checkpoint, sent_at) of receipts asked for
        self.pending: dict[int, tuple[CheckpointRecord, float]] = {}
        self.window = asyncio.Event()
        self.request_task: asyncio.Task[None] | None = None
        self.deadline = 0.0  # wall-clock time at which the session expires
        self.ending = False  # `end` received; waiting for the last receipt
        self.ended = False  # `end` handled: the session is being settled
        self._send_lock = asyncio.Lock()

    # Frames ------------------------------------------------------------------------

    async def send(self, frame: dict[str, Any]) -> None:
        async with self._send_lock:
            if self.ws.application_state == WebSocketState.CONNECTED:
                await self.ws.send_json(frame)

    async def send_error(self, error: ProtocolError) -> None:
        self.node.metrics.errors.labels(code=error.code.value).inc()
        session = self.info.session_id if self.info else "-"
        log.warning("session %s: %s %s", session, error.code.value, error.message)
        await self.send(error.frame())

    # Lifecycle ---------------------------------------------------------------------

    async def run(self) -> None:
        await self.ws.accept()
        await self.send(
            {
                "type": "challenge",
                "protocol": PROTOCOL_VERSION,
                "nonce": "0x" + self.nonce.hex(),
                "host": self.node.address,
                "chain_id": self.node.contracts.chain.chain_id,
                "marketplace": self.node.contracts.marketplace.address,
                "model": self.node.model_name,
            }
        )
        try:
            await self._read_loop()
        finally:
            await self._cleanup()

    async def _read_loop(self) -> None:
        max_bytes = self.node.settings.max_frame_bytes
        while True:
            try:
                if self.ending:
                    # After `end`, wait a bounded time for the last receipt.
                    message = await asyncio.wait_for(self.ws.receive(), self.node.receipt_timeout)
                else:
                    message = await self.ws.receive()
            except TimeoutError:
                await self._finish_session()
                return
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            raw = message.get("text")
            if raw is None:
                raw = message.get("bytes") or b""
            try:
                frame = parse_client_frame(raw, max_bytes)
                if await self._dispatch(frame):
                    return
            except ProtocolError as error:
                await self.send_error(error)
                if error.fatal:
                    return
            except Exception:
                log.exception("internal error while handling a frame")
                await self.send_error(ProtocolError(ErrorCode.INTERNAL, "internal node error"))
                return

    async def _dispatch(self, frame: Any) -> bool:
        """Handle one frame; True when the connection should close."""
        if isinstance(frame, Ping):
            await self.send({"type": "pong"})
            return False
        if isinstance(frame, SessionInit):
            if self.info is not None:
                raise ProtocolError(ErrorCode.ALREADY_AUTHENTICATED, "session_init sent twice")
            await self._login(frame)
            return False
        if self.info is None:
            raise ProtocolError(
                ErrorCode.NOT_AUTHENTICATED, f"send session_init before {frame.type}"
            )
        if isinstance(frame, Prompt):
            if self.request_task is not None and not self.request_task.done():
                raise ProtocolError(
                    ErrorCode.REQUEST_IN_PROGRESS,
                    "a reply is still streaming; wait for its done frame",
                )
            self.request_task = asyncio.create_task(self._serve_prompt(frame))
            return False
        if isinstance(frame, ReceiptFrame):
            await self._accept_receipt(frame)
            if self.ending and self.receipted == self.generated:
                await self._finish_session()
                return True
            return False
        if isinstance(frame, End):
            return await self._end()
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unhandled frame {frame.type}")

    async def _cleanup(self) -> None:
        if self.request_task is not None and not self.request_task.done():
            self.request_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.request_task
        if self.info is not None:
            sid = self.info.session_id
            if not self.ended:
                # Left without `end`: settle after a grace period unless the client returns.
                due = time.time() + self.node.settings.disconnect_grace
                await asyncio.to_thread(
                    self.node.outbox.schedule_settlement, sid, "disconnect", due
                )
                log.info(
                    "session %s: client left without end; settlement in %.0fs unless it returns",
                    sid,
                    self.node.settings.disconnect_grace,
                )
            self.node.live_sessions.discard(sid)
            self.node.metrics.sessions_active.dec()
        if self.ws.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close()

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
            raise ProtocolError(ErrorCode.CHAIN_UNAVAILABLE, str(exc)) from exc
        if not info.exists:
            raise ProtocolError(
                ErrorCode.SESSION_NOT_FOUND, f"session {frame.session_id} does not exist"
            )
        if info.host.lower() != node.address.lower():
            raise ProtocolError(
                ErrorCode.WRONG_HOST,
                f"session {frame.session_id} belongs to host {info.host}, not {node.address}",
            )
        if not info.is_open:
            raise ProtocolError(
                ErrorCode.SESSION_CLOSED, f"session {frame.session_id} is already settled"
            )
        if info.close_requested_at:
            raise ProtocolError(
                ErrorCode.SESSION_CLOSED, f"the depositor asked to close session {info.session_id}"
            )
        if chain_now >= info.expires_at:
            raise ProtocolError(
                ErrorCode.SESSION_CLOSED, f"session {frame.session_id} expired at {info.expires_at}"
            )
        if info.model_id != node.model_id:
            raise ProtocolError(
                ErrorCode.MODEL_NOT_SERVED,
                f"session is for model 0x{info.model_id.hex()}; this node serves "
                f"{node.model_name} (0x{node.model_id.hex()})",
            )
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
        if info.session_id in node.live_sessions:
            raise ProtocolError(
                ErrorCode.SESSION_BUSY,
                f"session {info.session_id} already has a live connection; close it first",
            )
        record = await asyncio.to_thread(node.state.upsert_session, _record_of(info))
        settlement = await asyncio.to_thread(node.outbox.settlement, info.session_id)
        if settlement is not None and not await asyncio.to_thread(
            node.outbox.cancel_disconnect_settlement, info.session_id
        ):
            raise ProtocolError(
                ErrorCode.SESSION_CLOSED,
                f"session {info.session_id} is being settled ({settlement.reason}); "
                "open a new session",
            )
        node.live_sessions.add(info.session_id)
        node.metrics.sessions_active.inc()
        self.info = info
        # Tokens streamed after the last receipt of a dropped connection are not billed.
        self.receipted = self.generated = self.checkpointed = record.tokens_receipted
        await asyncio.to_thread(node.outbox.abandon_unreceipted, info.session_id, self.receipted)
        self.transcript = TranscriptHash(info.session_id, record.last_transcript_hash)
        self.budget = budget_tokens(info.deposit, info.price_per_mtok)
        self.deadline = time.time() + (info.expires_at - chain_now)
        log.info("session %s: logged in (receipted %s tokens)", info.session_id, self.receipted)
        await self.send(
            {
                "type": "session_ready",
                "session_id": info.session_id,
                "model": node.model_name,
                "price_per_mtok": info.price_per_mtok,
                "proof_interval": info.proof_interval,
                "budget_tokens": self.budget,
                "tokens_receipted": self.receipted,
                "transcript_hash": "0x" + self.transcript.value.hex(),
                "expires_at": info.expires_at,
            }
        )

    # Streaming ---------------------------------------------------------------------

    async def _serve_prompt(self, prompt: Prompt) -> None:
        try:
            await self._stream(prompt)
        except ProtocolError as error:
            await self.send_error(error)
            if error.fatal:
                with contextlib.suppress(Exception):
                    await self.ws.close()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("generation failed")
            await self.send_error(ProtocolError(ErrorCode.INTERNAL, "generation failed"))

    async def _stream(self, prompt: Prompt) -> None:
        assert self.info is not None and self.transcript is not None
        node = self.node
        left = self.budget - self.generated
        if left <= 0:
            raise ProtocolError(
                ErrorCode.BUDGET_EXHAUSTED,
                f"the deposit is used up ({self.generated} tokens); open a new session",
            )
        if time.time() >= self.deadline:
            raise ProtocolError(ErrorCode.SESSION_CLOSED, "the session's max duration has passed")
        record = await asyncio.to_thread(node.state.get_session, self.info.session_id)
        if record is None or record.status != "open":
            raise ProtocolError(
                ErrorCode.SESSION_CLOSED,
                f"session {self.info.session_id} is being settled (the depositor asked to close, "
                "or it is about to expire); open a new session",
            )
        limit = min(prompt.max_tokens or left, left)
        try:
            params = GenerationParams(
                max_tokens=limit,
                temperature=prompt.temperature,
                top_p=prompt.top_p,
                seed=prompt.seed,
                stop=tuple(prompt.stop),
            )
        except (ValueError, TypeError) as exc:
            raise ProtocolError(ErrorCode.BAD_REQUEST, str(exc)) from exc
        messages = [m.model_dump() for m in prompt.messages]
        capture = node.prover.needs_hidden_states and node.backend.supports_hidden_states
        try:
            prompt_ids = await asyncio.to_thread(prompt_token_ids, node.backend, messages)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.BAD_REQUEST, str(exc)) from exc
        self.trace = ReplyTrace(prompt_ids, keep_rows=capture)
        received = time.monotonic()
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=_HANDOFF_DEPTH)
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        row = await asyncio.to_thread(
            node.state.start_request, self.info.session_id, prompt.request_id, 0
        )
        slots = node.generation_slots()
        node.metrics.generation_queue.inc()
        try:
            await slots.acquire()
        finally:
            node.metrics.generation_queue.dec()
        try:
            worker = loop.run_in_executor(
                node.generation_executor(),
                self._generate,
                messages,
                params,
                capture,
                queue,
                loop,
                stop,
            )
            count, reason, prompt_tokens = 0, "length", 0
            try:
                while True:
                    event = await queue.get()
                    if event is _END:
                        break
                    if isinstance(event, BaseException):
                        raise ProtocolError(ErrorCode.BAD_REQUEST, f"generation refused: {event}")
                    if isinstance(event, Finish):
                        reason, prompt_tokens = event.reason, event.prompt_tokens or 0
                        continue
                    if isinstance(event, Hidden):
                        self.trace.add_rows(event)
                        await self._checkpoint_when_ready()
                        continue
                    await self._wait_for_window()
                    if time.time() >= self.deadline:
                        reason = "budget"
                        break
                    await self._send_token(prompt.request_id, event)
                    await self._checkpoint_when_ready()
                    count += 1
                    if count == 1:
                        node.metrics.time_to_first_token.observe(time.monotonic() - received)
            finally:
                # Stop the worker and keep the queue empty until it has let go of the model.
                stop.set()
                while not worker.done():
                    with contextlib.suppress(asyncio.QueueEmpty):
                        queue.get_nowait()
                    await asyncio.sleep(0.001)
        finally:
            slots.release()
        if count == left:
            reason = "budget"
        async with self._checkpoint_lock:
            await self._checkpoint_tail()
        await asyncio.to_thread(node.state.add_generated, self.info.session_id, count)
        await asyncio.to_thread(node.state.finish_request, row, count, reason, prompt_tokens)
        await self.send(
            {
                "type": "done",
                "request_id": prompt.request_id,
                "finish_reason": reason,
                "prompt_tokens": prompt_tokens,
                "completion_tokens": count,
                "session_tokens": self.generated,
                "budget_tokens": self.budget,
            }
        )

    def _generate(
        self,
        messages: list[dict[str, str]],
        params: GenerationParams,
        capture: bool,
        queue: asyncio.Queue[Any],
        loop: asyncio.AbstractEventLoop,
        stop: threading.Event,
    ) -> None:
        """Worker thread: run the backend and hand each event to the event loop."""

        def put(item: Any) -> None:
            asyncio.run_coroutine_threadsafe(queue.put(item), loop).result()

        events = None
        try:
            events = self.node.backend.generate(messages, params, capture_hidden_states=capture)
            for event in events:
                if stop.is_set():
                    return
                put(event)
        except Exception as exc:
            if not stop.is_set():
                put(exc)
        finally:
            if events is not None:
                events.close()
            if not stop.is_set():
                put(_END)

    async def _send_token(self, request_id: str, token: Token) -> None:
        assert self.info is not None and self.transcript is not None and self.trace is not None
        self.generated += 1
        self.transcript.update(token.token_id)
        self.trace.add_token(token.token_id)
        self.node.metrics.tokens_generated.inc()
        await self.send(
            {
                "type": "token",
                "request_id": request_id,
                "index": self.generated,
                "token_id": token.token_id,
                "text": token.text,
            }
        )
        if self.generated % self.info.proof_interval == 0:
            self.checkpoint_due = True

    async def _wait_for_window(self) -> None:
        """Block while the client owes a receipt for a whole interval."""
        assert self.info is not None
        while self.generated >= self.receipted + self.info.proof_interval:
            self.window.clear()
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
                # (the client leaving) that coincides with the receipt arriving.
                async with asyncio.timeout(self.node.receipt_timeout):
                    await self.window.wait()
            except TimeoutError as exc:
                raise ProtocolError(
                    ErrorCode.RECEIPT_TIMEOUT,
                    f"no receipt for {self.generated} tokens within "
                    f"{self.node.receipt_timeout:.0f}s",
                ) from exc

    # Receipts ----------------------------------------------------------------------

    async def _checkpoint_when_ready(self) -> None:
        """Build a due checkpoint once the row of its last token has arrived."""
        assert self.trace is not None
        if self.checkpoint_due and self.trace.rows_ready():
            async with self._checkpoint_lock:
                self.checkpoint_due = False
                await self._request_receipt()

    async def _checkpoint_tail(self) -> None:
        """At the end of a reply (or on `end`): a checkpoint for tokens not yet covered."""
        self.checkpoint_due = False
        if self.generated > self.checkpointed:
            await self._request_receipt()

    async def _request_receipt(self) -> None:
        """Prove the tokens since the last checkpoint, store it, then ask for the receipt."""
        assert self.info is not None and self.transcript is not None and self.trace is not None
        job = CheckpointJob(
            session_id=self.info.session_id,
            token_start=self.checkpointed,
            token_end=self.generated,
            transcript_hash=self.transcript.value,
            segment=self.trace.take_segment(),
        )
        self.checkpointed = self.generated
        # Shielded: once proving starts, its checkpoint row is written even if `end` or a
        # disconnect cancels this task meanwhile.
        record = await asyncio.shield(asyncio.to_thread(build_checkpoint, self.node, job))
        self.pending[job.token_end] = (record, time.monotonic())
        await self.send(
            {
                "type": "receipt_request",
                "session_id": self.info.session_id,
                "tokens": job.token_end,
                "proof_hash": "0x" + record.proof_hash.hex(),
                "transcript_hash": "0x" + job.transcript_hash.hex(),
                "proof_uri": proof_uri(record.proof_hash),
            }
        )

    async def _accept_receipt(self, frame: ReceiptFrame) -> None:
        assert self.info is not None
        if frame.tokens <= self.receipted:
            raise ProtocolError(
                ErrorCode.RECEIPT_UNEXPECTED,
                f"receipt for {frame.tokens} tokens ignored: {self.receipted} already receipted",
            )
        requested = self.pending.get(frame.tokens)
        if requested is None:
            raise ProtocolError(
                ErrorCode.RECEIPT_MISMATCH,
                f"receipt for {frame.tokens} tokens, but the node asked for "
                f"{sorted(self.pending) or 'none'}",
            )
        checkpoint, sent_at = requested
        proof_hash = checkpoint.proof_hash
        if frame.proof_hash != "0x" + proof_hash.hex():
            raise ProtocolError(
                ErrorCode.RECEIPT_MISMATCH,
                f"receipt for {frame.tokens} tokens carries another proof hash",
            )
        receipt = Receipt(self.info.session_id, frame.tokens, proof_hash)
        signature = bytes.fromhex(frame.signature[2:])
        try:
            check_receipt_signature(self.node.domain, receipt, signature, self.info.signer)
        except InvalidSignature as exc:
            raise ProtocolError(ErrorCode.RECEIPT_INVALID, str(exc)) from exc
        await asyncio.to_thread(
            self.node.state.store_receipt,
            receipt.session_id,
            receipt.tokens,
            proof_hash,
            signature,
            checkpoint.transcript_hash,
        )
        self.node.metrics.checkpoints.labels(state="receipted").inc()
        await self._queue_on_chain(checkpoint)
        self.receipted = frame.tokens
        self.pending = {t: v for t, v in self.pending.items() if t > frame.tokens}
        self.node.metrics.receipt_round_trip.observe(time.monotonic() - sent_at)
        log.info(
            "session %s: checkpoint stored: receipt for %s tokens signed (proof_hash 0x%s)",
            receipt.session_id,
            receipt.tokens,
            proof_hash.hex(),
        )
        self.window.set()
        await self.send({"type": "receipt_ack", "tokens": frame.tokens})

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

    async def _end(self) -> bool:
        """Stop any reply; ask for a receipt of unreceipted tokens before settling."""
        async with self._checkpoint_lock:
            if self.request_task is not None and not self.request_task.done():
                self.request_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.request_task
            if self.generated > self.receipted:
                await self._checkpoint_tail()
                self.ending = True
                return False
        await self._finish_session()
        return True

    async def _finish_session(self) -> None:
        """Say goodbye, settle on chain, and tell the client what was paid."""
        assert self.info is not None
        sid = self.info.session_id
        self.ended = True
        await self._send_session_end()
        await asyncio.to_thread(self.node.outbox.schedule_settlement, sid, "end", time.time())
        self.node.settlement.wake()
        deadline = time.monotonic() + self.node.settings.settlement_wait
        while True:
            settlement = await asyncio.to_thread(self.node.outbox.settlement, sid)
            done = settlement is not None and settlement.status != "pending"
            if done or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        if settlement is None or settlement.status != "settled":
            if settlement is not None and settlement.status == "failed":
                reason = f"the node could not settle: {settlement.last_error}"
            else:
                reason = (settlement and settlement.last_error) or "settlement is still running"
            await self.send({"type": "settlement_pending", "session_id": sid, "reason": reason})
            return
        await self.send(
            {
                "type": "settled",
                "session_id": sid,
                "tokens": settlement.tokens,
                "host_amount": settlement.host_amount,
                "fee": settlement.fee,
                "refund": settlement.refund,
                "refund_credited": settlement.refund_credited,
                "tx_hash": settlement.tx_hash,
            }
        )

    async def _send_session_end(self) -> None:
        assert self.info is not None
        await self.send(
            {
                "type": "session_end",
                "session_id": self.info.session_id,
                "tokens_generated": self.generated,
                "tokens_receipted": self.receipted,
            }
        )


def _record_of(info: SessionInfo) -> SessionRecord:
    return SessionRecord(
        session_id=info.session_id,
        depositor=info.depositor,
        signer=info.signer,
        model_id=info.model_id,
        deposit=info.deposit,
        price_per_mtok=info.price_per_mtok,
        proof_interval=info.proof_interval,
        expires_at=info.expires_at,
    )
