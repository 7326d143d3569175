"""The gateway's sessions: one per (model, host), reused across requests.

Opening a session is two transactions and a deposit, so a session is kept and reused
until its deposit or lifetime runs low, then retired (closed, the unspent deposit
refunded) and a new one opened. Idle sessions are closed after ``idle_close`` seconds,
all of them on shutdown, and the sessions a killed gateway left open (their records are
in the gateway's own record store) are closed at the next start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from inferledger.chain.errors import ChainError
from inferledger.chain.units import Prices, cost, format_usdc
from inferledger.gateway.errors import budget_exceeded, unavailable
from inferledger.gateway.hosts import HostChooser
from inferledger.sdk import Client, HostOffer, SdkError, Session, SessionRecord, Settlement

log = logging.getLogger("inferledger.gateway")
LOW_LIFETIME = 0.2  # retire a session with less than this share of its duration left
CLOSE_TIMEOUT = 30.0  # seconds to wait for a node's settlement before asking the chain

Need = Callable[[Prices], int]
"""What a request may cost at a session's prices, in base units."""


def signed_cost(record: SessionRecord) -> int:
    """What the session signer has signed for so far: the most the chain can pay."""
    return cost(*record.signed_counts(), record.input_price_per_mtok, record.output_price_per_mtok)


@dataclass
class Pooled:
    """A session the gateway holds; ``lock`` is held by the request using it."""

    session: Session
    model: str
    opened: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    requests: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def prices(self) -> Prices:
        return Prices(self.session.input_price_per_mtok, self.session.output_price_per_mtok)

    def usable_for(self, need: int) -> bool:
        """Open, with deposit left for ``need`` and a fair share of its lifetime."""
        session = self.session
        lifetime = session.record.max_duration
        left = session.record.created_at + lifetime - time.time()
        return (
            not session.closed
            and session.deposit - signed_cost(session.record) >= need
            and left > LOW_LIFETIME * lifetime
        )


class SessionPool:
    def __init__(
        self,
        client: Client,
        chooser: HostChooser,
        *,
        deposit: int,
        duration: int,
        idle_close: float,
    ) -> None:
        self._client = client
        self.chooser = chooser
        self.deposit = deposit
        self.duration = duration
        self.idle_close = idle_close
        self.sessions: dict[tuple[bytes, str], Pooled] = {}
        self.settlements: list[Settlement] = []
        self._closing: set[asyncio.Task[None]] = set()
        self._finalizable: dict[int, Session] = {}  # closing on chain, window not passed
        self._opening = asyncio.Lock()

    async def acquire(self, model_id: bytes, model: str, need: Need) -> Pooled:
        """A locked session for ``model_id`` with room for ``need``: a pooled one on a host
        not avoided, else a new one with the cheapest ready host. 503 when none is ready."""
        while True:
            for key, pooled in list(self.sessions.items()):
                if key[0] != model_id or self.chooser.avoided(pooled.session.host):
                    continue
                await pooled.lock.acquire()
                if self.sessions.get(key) is pooled and pooled.usable_for(need(pooled.prices)):
                    return pooled
                pooled.lock.release()
                self.retire(pooled, "its deposit or lifetime is running low")
            async with self._opening:
                if self._pooled_for(model_id):
                    continue  # another request opened one meanwhile: queue for it
                opened: Pooled | None = None
                while opened is None:
                    offer = await self.chooser.choose(model_id)  # failed hosts are avoided
                    if offer is None:
                        raise unavailable(
                            f"no active host serving {model!r} within the price caps is ready "
                            f"(hosts avoided after failures: {len(self.chooser.avoided_hosts())})"
                            "; retry later"
                        )
                    prices = Prices(offer.input_price_per_mtok, offer.output_price_per_mtok)
                    opened = await self._open(offer, model, max(self.deposit, need(prices)))
            await opened.lock.acquire()
            return opened

    def _pooled_for(self, model_id: bytes) -> bool:
        return any(
            key[0] == model_id and not self.chooser.avoided(p.session.host)
            for key, p in self.sessions.items()
        )

    async def _open(self, offer: HostOffer, model: str, deposit: int) -> Pooled | None:
        """A new pooled session with ``offer``; None (and the host avoided) when the SDK
        refuses the host. 402 when the account cannot fund the deposit."""
        balance = await asyncio.to_thread(self._client.balance)
        if balance < deposit:
            raise budget_exceeded(
                "balance",
                format_usdc(balance),
                f"the gateway's account {self._client.address} holds {format_usdc(balance)} "
                f"USDC, less than a session's deposit of {format_usdc(deposit)}: fund it or "
                "lower gateway_deposit",
            )
        try:
            session = await asyncio.to_thread(
                self._client.sessions.open, offer, None, deposit, max_duration=self.duration
            )
        except SdkError as exc:
            self.chooser.avoid(offer.address, f"opening a session failed: {exc}")
            return None
        log.info(
            "opened session %d with host %s for %s, deposit %s USDC",
            session.id,
            offer.address,
            model,
            format_usdc(deposit),
        )
        pooled = Pooled(session, model)
        self.sessions[(offer.model_id, offer.address)] = pooled
        return pooled

    def release(self, pooled: Pooled) -> None:
        pooled.last_used = time.monotonic()
        pooled.requests += 1
        pooled.lock.release()

    def retire(self, pooled: Pooled, why: str) -> None:
        """Take the session out of the pool and close it in the background."""
        key = (pooled.session.model_id, pooled.session.host)
        if self.sessions.get(key) is not pooled:
            return
        del self.sessions[key]
        log.info("closing session %d: %s", pooled.session.id, why)
        task = asyncio.get_running_loop().create_task(self._close(pooled))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, pooled: Pooled) -> None:
        async with pooled.lock:  # after the request using it, if any
            await self._settle(pooled.session)

    async def _settle(self, session: Session) -> None:
        try:
            settlement = await asyncio.to_thread(session.close, CLOSE_TIMEOUT)
        except Exception as exc:  # the chain failed too: the record stays for the next start
            log.error("could not close session %d: %s", session.id, exc)
            return
        self._record(session, settlement)

    def _record(self, session: Session, settlement: Settlement) -> None:
        """Keep a close's outcome; a session left closing is finalized by the sweep."""
        self.settlements.append(settlement)
        if not settlement.settled:
            self._finalizable[session.id] = session
        log.info(
            "session %d %s: host %s, fee %s, refund %s USDC",
            session.id,
            settlement.status,
            format_usdc(settlement.host_amount),
            format_usdc(settlement.fee),
            format_usdc(settlement.refund),
        )

    async def sweep(self) -> None:
        """Close the sessions unused for ``idle_close`` seconds, and finalize those left
        closing on chain once their close window has passed (both refund the deposit)."""
        now = time.monotonic()
        for pooled in list(self.sessions.values()):
            if not pooled.lock.locked() and now - pooled.last_used > self.idle_close:
                self.retire(pooled, f"idle for {self.idle_close:.0f}s")
        for session in list(self._finalizable.values()):
            await self._finalize(session)

    async def _finalize(self, session: Session) -> None:
        """Finalize a session closing on chain once it may be; forget it once settled
        (the host may still settle it with its last receipt during the close window)."""
        try:
            status = await asyncio.to_thread(session.status)
            if status.state == "settled":
                self._finalizable.pop(session.id, None)
                return
            if not status.can_finalize:
                return
            settlement = await asyncio.to_thread(session.finalize)
        except (SdkError, ChainError) as exc:
            log.error("could not finalize session %d: %s", session.id, exc)
            return
        self._finalizable.pop(session.id, None)
        self._record(session, settlement)
        log.info("finalized session %d: refund %s USDC", session.id, format_usdc(settlement.refund))

    async def close_all(self) -> None:
        """Close every session and wait for the closes started earlier (shutdown)."""
        for pooled in list(self.sessions.values()):
            self.retire(pooled, "the gateway is shutting down")
        while self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def leftovers(self) -> list[SessionRecord]:
        """Records of sessions a previous gateway left unsettled or closing on chain."""
        return [
            r
            for r in self._client.sessions.records()
            if r.settlement is None or r.settlement.get("status") == "closing"
        ]

    async def reconcile(self, records: list[SessionRecord]) -> None:
        """Close what a killed gateway left open; finalize what it left closing (now, or
        in the sweep once the close window has passed)."""
        for record in records:
            session = self._client.sessions.resume(record.session_id, auto_close=False)
            if session.settlement is None:
                await self._settle(session)
            else:
                self._finalizable[session.id] = session
                await self._finalize(session)

    def view(self) -> list[dict[str, Any]]:
        """The open sessions, for ``GET /v1/inferledger/sessions``."""
        return [
            {
                "session_id": p.session.id,
                "model": p.model,
                "host": p.session.host,
                "deposit": format_usdc(p.session.deposit),
                "spent": format_usdc(signed_cost(p.session.record)),
                "input_tokens": p.session.input_tokens,
                "output_tokens": p.session.tokens,
                "requests": p.requests,
                "busy": p.lock.locked(),
            }
            for p in self.sessions.values()
        ]
