"""The gateway itself: an OpenAI chat request in, a paid reply from a host out.

For each request: check the spend limits, take a pooled session (or open one with the
cheapest ready host), send the prompt through the SDK (which signs receipts only for
what arrived), and report what it cost. A host that fails before anything reached the
client is avoided and the request tried on the next one; after that, a stream ends with
an error event. What a request costs is what the session signer signed for during it,
so a host is never paid for more than it delivered.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol, TypeVar

import anyio
import numpy as np
from prometheus_client import CollectorRegistry

from inferledger.chain.units import Prices, cost, format_usdc, price_per_token_to_mtok, usdc
from inferledger.config import ConfigError, Settings
from inferledger.gateway import schema
from inferledger.gateway.disputes import AutoDisputes
from inferledger.gateway.errors import (
    GatewayError,
    from_sdk,
    host_fault,
    model_not_found,
    session_spent,
    upstream_failed,
)
from inferledger.gateway.hosts import HostChooser, PriceCaps
from inferledger.gateway.ledger import Limits, SpendLedger
from inferledger.gateway.pool import Pooled, SessionPool, signed_cost
from inferledger.gateway.verify import Verifier
from inferledger.paths import home
from inferledger.proofs.verify import VerifierModel
from inferledger.protocol.client import prompt_token_bound
from inferledger.sdk import Client, Reply, SdkError, Session, SessionRecord
from inferledger.sdk.hosts import model_id_of

log = logging.getLogger("inferledger.gateway")
T = TypeVar("T")
MAX_ATTEMPTS = 3  # hosts tried for one request before giving up
SWEEP_EVERY = 1.0  # seconds between sweeps for idle and finalizable sessions (at most)


def state_dir(settings: Settings) -> Path:
    """Where the gateway keeps its session records and spend ledger."""
    return settings.gateway_state_dir or home() / "gateway"


def _base_units(amount: Any) -> int | None:
    return None if amount is None else usdc(amount)


def per_token(price_per_mtok: int) -> str:
    """Base units per million tokens -> USDC per token, as a decimal string."""
    return format(Decimal(price_per_mtok).scaleb(-12).normalize(), "f")


def spent(attempts: list[dict[str, Any]]) -> int:
    """What failed attempts at a request cost together, in base units."""
    return sum(usdc(attempt["cost"]) for attempt in attempts)


def _per_mtok(price: Any) -> int | None:
    return None if price is None else price_per_token_to_mtok(price)


@dataclass
class Lease:
    """One request's hold on a pooled session: what it sends, and the session's signed
    cost and receipts before it, to tell what the request added. ``failed_attempts``:
    the hosts tried before this one for the same request, and what each cost."""

    pooled: Pooled
    messages: list[dict[str, str]]
    params: dict[str, Any]
    paid_before: int
    receipts_before: int
    pieces: AsyncGenerator[str, None] | None = None
    ended: bool = False
    spent: int = 0  # what was signed for during the request, once it ended
    failed_attempts: list[dict[str, Any]] = field(default_factory=list)  # hosts tried first

    @property
    def session(self) -> Session:
        return self.pooled.session


class LocalModel(Protocol):
    """The model the user holds locally (an inference backend), to re-verify proofs (with
    its ``logits`` and ``dtype`` when it has them, as ``VerifierModel.of`` reads them)."""

    def prefill_hidden_states(self, token_ids: Sequence[int]) -> np.ndarray: ...

    def tokenize_chat(self, messages: Sequence[dict[str, str]]) -> Sequence[int]: ...


class Gateway:
    """Serves OpenAI chat requests by paying hosts per token from ``client``'s account.

    ``client`` must keep its session records in the gateway's own directory
    (``sessions_dir=state_dir(settings) / "sessions"``), so that the sessions it finds
    there at start are the ones a previous gateway left open.
    """

    def __init__(
        self, client: Client, settings: Settings, *, local_model: LocalModel | None = None
    ) -> None:
        self.client = client
        self.settings = settings
        self.registry = CollectorRegistry()
        self.verifier: Verifier | None = None
        if settings.gateway_verify_share > 0:
            if local_model is None:
                raise ConfigError(
                    "setting gateway_verify_share (INFERLEDGER_GATEWAY_VERIFY_SHARE): verifying "
                    "checkpoints needs the model locally; load it or set the share to 0"
                )
            self.verifier = Verifier(
                settings.gateway_verify_share,
                VerifierModel.of(local_model),
                local_model.tokenize_chat,
                self.registry,
            )
        self.disputes: AutoDisputes | None = None
        if settings.gateway_auto_dispute:
            if self.verifier is None:
                raise ConfigError(
                    "setting gateway_auto_dispute (INFERLEDGER_GATEWAY_AUTO_DISPUTE): disputes "
                    "come from failed background verification; set gateway_verify_share above 0"
                )
            self.disputes = AutoDisputes(client, self.verifier, self.registry)
        self.reserve_tokens = settings.gateway_reserve_tokens
        self.ledger = SpendLedger(
            state_dir(settings) / "spend.json",
            Limits(
                _base_units(settings.gateway_spend_limit_day),
                _base_units(settings.gateway_spend_limit_total),
            ),
        )
        caps = PriceCaps(
            _per_mtok(settings.gateway_max_input_price), _per_mtok(settings.gateway_max_price)
        )
        self.chooser = HostChooser(client, caps, settings.gateway_host_cooldown)
        self.pool = SessionPool(
            client,
            self.chooser,
            deposit=usdc(settings.gateway_deposit),
            duration=settings.gateway_session_duration,
            idle_close=settings.gateway_idle_close,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self.reconciled = asyncio.Event()

    # Lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Close what a previous gateway left open (in the background) and start the
        idle sweep."""
        leftovers = self.pool.leftovers()  # before this gateway opens any session
        if leftovers:
            log.info("closing %d session(s) a previous gateway left open", len(leftovers))
        self._tasks = [
            asyncio.create_task(self._reconcile(leftovers)),
            asyncio.create_task(self._sweep()),
        ]

    async def stop(self) -> None:
        """Close every session (SIGINT/SIGTERM end up here through the server)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pool.close_all()
        if self.verifier is not None:
            await asyncio.to_thread(self.verifier.close)

    async def _reconcile(self, leftovers: list[SessionRecord]) -> None:
        try:
            await self.pool.reconcile(leftovers)
        finally:
            self.reconciled.set()

    async def _sweep(self) -> None:
        while True:  # idle sessions closed, closing ones finalized
            await asyncio.sleep(min(SWEEP_EVERY, self.settings.gateway_idle_close / 4))
            await self.pool.sweep()
            if self.disputes is not None:
                await asyncio.to_thread(self.disputes.sweep)

    # Models --------------------------------------------------------------------------

    async def models(self) -> list[dict[str, Any]]:
        """Approved models with an active host, each at its cheapest offer's prices."""
        cheapest: dict[bytes, Prices] = {}
        for offer in await self.chooser.offers():  # cheapest output price first
            cheapest.setdefault(
                offer.model_id, Prices(offer.input_price_per_mtok, offer.output_price_per_mtok)
            )
        names = await asyncio.to_thread(self._approved_names, list(cheapest))
        return [
            {
                "id": names[model_id],
                "object": "model",
                "created": 0,
                "owned_by": "inferledger",
                "inferledger_model_id": "0x" + model_id.hex(),
                "pricing": {  # USDC per token, as OpenRouter lists prices
                    "prompt": per_token(prices.input_per_mtok),
                    "completion": per_token(prices.output_per_mtok),
                    "input_price_per_mtok": prices.input_per_mtok,
                    "output_price_per_mtok": prices.output_per_mtok,
                },
            }
            for model_id, prices in cheapest.items()
            if model_id in names
        ]

    def _approved_names(self, model_ids: list[bytes]) -> dict[bytes, str]:
        models = self.client.contracts.models
        return {m: models.model_name(m) for m in model_ids if models.is_approved(m)}

    async def _model_id(self, model: str) -> bytes:
        """The model id of a name (or 0x id) the ModelRegistry approved; else 404."""
        try:
            model_id = model_id_of(model)
        except (SdkError, ValueError):  # a malformed 0x id
            raise model_not_found(model) from None
        if not await asyncio.to_thread(self.client.contracts.models.is_approved, model_id):
            raise model_not_found(model)
        return model_id

    # Chat ----------------------------------------------------------------------------

    async def complete(self, request: schema.ChatRequest) -> tuple[dict[str, Any], Lease]:
        """A whole reply: the ``chat.completion`` body, and the (ended) lease that served it."""

        async def chat(lease: Lease) -> Reply:
            return await lease.session.chat(lease.messages, **lease.params)

        reply, lease = await self._serve(request, chat)
        try:
            usage = self._usage(lease, reply)
            ident = schema.completion_id(lease.session.id, lease.session.record.request_seq)
            return schema.completion(
                ident, request.model, reply.text, reply.finish_reason, usage
            ), lease
        finally:
            await self.end(lease)

    async def stream(
        self, request: schema.ChatRequest
    ) -> tuple[AsyncGenerator[bytes, None], Lease]:
        """A streamed reply as SSE bytes, and its lease, which the caller must ``end``
        if it does not drain the stream (the stream ends it otherwise).

        The first piece is awaited here, so a host that fails before it is replaced
        by the next one and the client gets an HTTP status rather than a broken stream.
        """

        async def first_piece(lease: Lease) -> str | None:
            lease.pieces = lease.session.stream(lease.messages, **lease.params)
            try:
                return await anext(lease.pieces)
            except StopAsyncIteration:
                return None

        first, lease = await self._serve(request, first_piece)
        return self._events(request, lease, first), lease

    async def _serve(
        self, request: schema.ChatRequest, start: Callable[[Lease], Awaitable[T]]
    ) -> tuple[T, Lease]:
        """Run ``start`` on a leased session; a host or session that fails is replaced
        (up to ``MAX_ATTEMPTS`` times), anything else is the client's answer."""
        model_id = await self._model_id(request.model)
        failure: Exception | None = None
        failed: list[dict[str, Any]] = []
        for _ in range(MAX_ATTEMPTS):
            try:
                lease = await self._lease(model_id, request)
            except GatewayError as error:  # no host left, say: the failed tries still cost
                error.spent = spent(failed)
                raise
            lease.failed_attempts = failed
            try:
                return await start(lease), lease
            except Exception as exc:
                failure = exc
                await self.end(lease, exc)
                failed.append(
                    {
                        "host": lease.session.host,
                        "session_id": lease.session.id,
                        "cost": format_usdc(lease.spent),
                        "error": str(exc),
                    }
                )
                if not (host_fault(exc) or session_spent(exc)):
                    break
            except BaseException:
                await self.end(lease, abandoned=True)
                raise
        assert failure is not None
        answer = from_sdk(failure)
        answer.spent = spent(failed)
        raise answer from failure

    async def _events(
        self, request: schema.ChatRequest, lease: Lease, first: str | None
    ) -> AsyncGenerator[bytes, None]:
        session = lease.session
        ident = schema.completion_id(session.id, session.record.request_seq)

        def event(delta: dict[str, str] | None, **extra: Any) -> bytes:
            body = schema.chunk(ident, request.model, delta, **extra)
            return f"data: {json.dumps(body)}\n\n".encode()

        failure: Exception | None = None
        finished = False
        try:
            yield event({"role": "assistant", "content": ""})
            if first is not None:
                assert lease.pieces is not None
                yield event({"content": first})
                try:
                    async for piece in lease.pieces:
                        yield event({"content": piece})
                except Exception as exc:
                    failure, finished = exc, True
                    yield upstream_failed(
                        f"host {session.host} failed mid-reply ({exc}); you pay only for the "
                        "tokens received and receipted"
                    ).sse_event()
                    return
            finished = True
            reply = session.last_reply
            assert reply is not None
            usage = self._usage(lease, reply)
            yield event({}, finish_reason=reply.finish_reason)
            if request.include_usage:
                yield event(None, usage=usage)
            yield b"data: [DONE]\n\n"
        finally:
            await self.end(lease, failure, abandoned=not finished)

    async def _lease(self, model_id: bytes, request: schema.ChatRequest) -> Lease:
        """A session with room for the request, and the parameters to send: without
        ``max_tokens``, the reply is held to what the spend limits leave."""
        messages = request.chat_messages()
        bound = prompt_token_bound(messages)
        limit = request.reply_limit

        def need(prices: Prices) -> int:
            return cost(bound, limit or self.reserve_tokens, *prices)

        pooled = await self.pool.acquire(model_id, request.model, need)
        try:
            self.ledger.check(need(pooled.prices))
            params = {**request.params(), **self._capped(pooled.prices, bound, limit)}
        except BaseException:
            self.pool.release(pooled)
            raise
        record = pooled.session.record
        return Lease(pooled, messages, params, signed_cost(record), len(record.receipts))

    def _capped(self, prices: Prices, bound: int, limit: int | None) -> dict[str, int]:
        """``max_tokens`` for a request without one, so a reply cannot outspend the limits
        (``ledger.check`` made sure at least ``reserve_tokens`` fit)."""
        tightest = self.ledger.tightest()
        if limit is not None or tightest is None or prices.output_per_mtok == 0:
            return {}
        spare = tightest[1] * 1_000_000 - bound * prices.input_per_mtok
        return {"max_tokens": spare // prices.output_per_mtok}

    async def end(
        self, lease: Lease, failure: BaseException | None = None, *, abandoned: bool = False
    ) -> None:
        """Finish a request, once, however it ended: stop a reply the client abandoned,
        count what was signed for as spent, avoid a failed host or retire a spent session,
        and hand the session to the next request.

        Shielded from cancellation (a client that left cancels the request's task), so the
        next request never sees the session before the abandoned reply has unwound.
        """
        if lease.ended:
            return
        lease.ended = True
        pooled = lease.pooled
        with anyio.CancelScope(shield=True):
            try:
                if abandoned:  # the SDK drops the connection; the next call resumes it
                    await asyncio.to_thread(pooled.session.disconnect)
                if lease.pieces is not None:
                    await lease.pieces.aclose()
                lease.spent = signed_cost(pooled.session.record) - lease.paid_before
                self.ledger.add(lease.spent)
                if failure is None:
                    return
                if host_fault(failure):
                    why = f"{failure.__class__.__name__}: {failure}"
                    self.chooser.avoid(pooled.session.host, why)
                    self.pool.retire(pooled, f"host {pooled.session.host} failed")
                elif session_spent(failure):
                    self.pool.retire(pooled, f"it takes no more prompts ({failure})")
            finally:
                self.pool.release(pooled)

    def _usage(self, lease: Lease, reply: Reply) -> dict[str, Any]:
        """OpenAI's usage, plus the cost (what was signed for) and the proof trail."""
        record = lease.session.record
        paid = signed_cost(record) - lease.paid_before
        signed = record.receipts[lease.receipts_before :]
        proofs = sorted({r.proof_hash for r in signed if int(r.proof_hash, 16)})
        completion = len(reply.token_ids)
        receipted_in, receipted_out = record.signed_counts()
        if self.verifier is not None:
            self.verifier.submit(record.model_copy(deep=True))
        return {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": reply.prompt_tokens + completion,
            "cost": format_usdc(paid),
            "inferledger": {
                "session_id": record.session_id,
                "host": record.host,
                "input_price_per_mtok": record.input_price_per_mtok,
                "output_price_per_mtok": record.output_price_per_mtok,
                "receipted_input_tokens": receipted_in,
                "receipted_output_tokens": receipted_out,
                "session_cost": format_usdc(signed_cost(record)),
                "receipts": len(signed),
                "checkpoints": len(proofs),
                "proof_hashes": proofs,
                "failed_attempts": lease.failed_attempts,
            },
        }

    # The gateway's own view ------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        """``GET /v1/inferledger/sessions``: open sessions, spend, avoided hosts."""
        limits = self.ledger.limits
        return {
            "sessions": self.pool.view(),
            "settled": [s.as_dict() for s in self.pool.settlements],
            "spend": {
                "today": format_usdc(self.ledger.spent_today()),
                "total": format_usdc(self.ledger.total),
                "limit_day": None if limits.per_day is None else format_usdc(limits.per_day),
                "limit_total": None if limits.total is None else format_usdc(limits.total),
            },
            "avoided_hosts": self.chooser.avoided_hosts(),
            "verification": {
                "share": self.settings.gateway_verify_share,
                "checked": self.verifier.view() if self.verifier is not None else [],
            },
        }
