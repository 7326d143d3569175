"""The settlement worker: turns the outbox into transactions until every session is paid out.

It runs in its own thread beside the server and reads only the durable outbox, so a node
killed at any point picks up where it stopped. It settles a session

- when the client sends ``end`` (at once),
- when the client disconnects without ``end`` (after ``disconnect_grace`` seconds),
- shortly before the session expires (``settle_before_expiry``, at most a tenth of the
  session's length),
- when the depositor calls ``request_close`` (within the close window),
- when a client keeps leaving without signing for what it was sent (``max_unpaid_resumes``),
- after a restart, every session left open or ended.

A session with a live connection is not settled under it: the connection is asked to stop
(``Node.request_stop``), collects the final receipt and then schedules the settlement itself;
the worker's own schedule is the fallback if it does not within the receipt timeout.

RPC errors, timeouts, nonce conflicts and underpriced gas are retried with exponential backoff
up to ``settlement_retry_cap``. A receipt the contract keeps refusing is dropped for the last
one already on chain, and after the deadline the worker calls ``finalize``: a deposit never
stays locked because of the host (docs/architecture.md, R1).
"""

from __future__ import annotations

import logging
import threading
import time

from inferledger.chain.contracts import SessionInfo, SettlementEvent
from inferledger.chain.errors import ChainError, ContractRevert
from inferledger.chain.units import format_usdc
from inferledger.node.metering import Counts, settle_lead
from inferledger.node.node import Node
from inferledger.node.outbox import SettlementReason, SettlementRecord

log = logging.getLogger("inferledger.node")

RETRY_BASE_SECONDS = 0.5
REVERTS_BEFORE_FALLBACK = 2
"""Attempts whose receipt the contract refused before settling at the on-chain checkpoint."""
STOP_MARGIN_SECONDS = 5.0
"""Beyond the receipt timeout: how long a stopping connection has before the worker settles."""


class SettlementWorker:
    """One thread per node; ``wake()`` after writing to the outbox to act at once."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.settings = node.settings
        self.sender = node.contracts.chain.sender(node.account)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_chain_poll = 0.0

    def start(self) -> SettlementWorker:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="inferledger-settlement", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        self.resume()
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("settlement worker: unexpected error; retrying")
            self._wake.wait(self.settings.chain_poll_interval / 4)
            self._wake.clear()

    # One pass ---------------------------------------------------------------------------

    def resume(self) -> None:
        """After a start: settle what an earlier run left behind (or wait for its client)."""
        outbox, grace = self.node.outbox, self.settings.disconnect_grace
        for record in self.node.state.list_sessions():
            if record.status in ("settled", "failed"):
                continue
            if outbox.settlement(record.session_id) is None:
                due = time.time() + (grace if record.status == "open" else 0)
                outbox.schedule_settlement(record.session_id, "restart", due)
                log.info(
                    "session %s: found %s after a restart; settlement due in %.0fs",
                    record.session_id,
                    record.status,
                    max(0.0, due - time.time()),
                )

    def run_once(self) -> None:
        """Submit queued checkpoints, settle what is due, and watch the chain now and then."""
        self._submit_checkpoints()
        for job in self.node.outbox.due_settlements(time.time()):
            if self._stop.is_set():
                return
            self.settle(job)
        if time.monotonic() >= self._next_chain_poll:
            self._next_chain_poll = time.monotonic() + self.settings.chain_poll_interval
            self._watch_chain()

    def _watch_chain(self) -> None:
        """Close requests and coming expiries of sessions this node still holds open."""
        market, outbox = self.node.contracts.marketplace, self.node.outbox
        try:
            chain_now = self.node.contracts.chain.now()
            held = self.node.state.list_sessions("open") + self.node.state.list_sessions("ended")
            for record in held:
                info = market.get_session(record.session_id)
                lead = settle_lead(
                    self.settings.settle_before_expiry, info.expires_at - info.created_at
                )
                if info.close_requested_at:
                    self._stop_and_settle(record.session_id, "close_requested")
                elif chain_now >= info.expires_at - lead:
                    self._stop_and_settle(record.session_id, "expiry")
                elif not info.is_open:
                    outbox.schedule_settlement(record.session_id, "restart", time.time())
        except ChainError as exc:
            log.warning("settlement worker: cannot watch the chain (%s); will retry", exc)

    def _stop_and_settle(self, session_id: int, reason: SettlementReason) -> None:
        """Settle now, or, with a live connection, once it has stopped and collected the
        final receipt (it schedules that itself; this schedule is the fallback)."""
        outbox = self.node.outbox
        existing = outbox.settlement(session_id)
        if existing is not None and existing.status != "pending":
            return
        if existing is None or existing.reason != reason:
            log.info("session %s: %s; stopping and settling", session_id, reason.replace("_", " "))
        due = time.time()
        if self.node.request_stop(session_id, reason):
            due += self.node.receipt_timeout + STOP_MARGIN_SECONDS
        outbox.schedule_settlement(session_id, reason, due)

    # Checkpoints on chain ---------------------------------------------------------------

    def _submit_checkpoints(self) -> None:
        outbox, market = self.node.outbox, self.node.contracts.marketplace
        for checkpoint in outbox.checkpoints_with_status("queued"):
            sid = checkpoint.session_id
            receipt = self.node.state.latest_receipt(sid)
            settlement = outbox.settlement(sid)
            if (
                receipt is None
                or receipt.tokens != checkpoint.token_end
                or (settlement is not None and settlement.status != "pending")
            ):
                # A later receipt (or the settlement) supersedes it; nothing to send.
                outbox.set_checkpoint_status(sid, checkpoint.token_end, "receipted")
                continue
            row = outbox.start_transaction(sid, "submit_checkpoint")
            try:
                tx = market.submit_checkpoint(
                    self.sender,
                    sid,
                    receipt.input_tokens,
                    receipt.tokens,
                    receipt.proof_hash,
                    proof_uri(receipt.proof_hash),
                    receipt.signature,
                )
            except ChainError as exc:
                self._tx_failed(row, "submit_checkpoint", exc)
                # A revert is not worth retrying (the settlement carries the receipt anyway);
                # anything else stays queued for the next pass.
                status = "failed" if isinstance(exc, ContractRevert) else "queued"
                outbox.set_checkpoint_status(
                    sid, checkpoint.token_end, status, error=str(exc), attempted=True
                )
                continue
            tx_hash = tx["transactionHash"].to_0x_hex()
            outbox.update_transaction(row, "confirmed", tx_hash=tx_hash)
            outbox.set_checkpoint_status(
                sid, checkpoint.token_end, "confirmed", tx_hash=tx_hash, attempted=True
            )
            self.node.metrics.checkpoints.labels(state="confirmed").inc()
            log.info(
                "session %s: checkpoint %s submitted on chain: %s tokens, tx %s",
                sid,
                checkpoint.idx,
                receipt.tokens,
                tx_hash,
            )

    # Settlement -------------------------------------------------------------------------

    def settle(self, job: SettlementRecord) -> None:
        """One attempt at settling ``job``; on failure it is rescheduled with backoff."""
        sid = job.session_id
        market = self.node.contracts.marketplace
        action = "complete_session"
        row = None
        try:
            info = market.get_session(sid)
            if not info.exists:
                self._give_up(job, f"session {sid} does not exist on chain")
                return
            if info.is_settled:
                self._record(job, info, None, "by_others")
                return
            deadline = market.session_deadline(sid)
            if self.node.contracts.chain.now() >= deadline:
                action = "finalize"
                row = self.node.outbox.start_transaction(sid, action)
                event = market.finalize(self.sender, sid)
            else:
                counts, proof_hash, signature = self._claim(job, info)
                row = self.node.outbox.start_transaction(sid, action)
                event = market.complete_session(
                    self.sender,
                    sid,
                    counts.input,
                    counts.output,
                    proof_hash,
                    proof_uri(proof_hash),
                    signature,
                )
        except ChainError as exc:
            if row is not None:
                self._tx_failed(row, action, exc)
            if not self._settled_meanwhile(job):
                self._retry(job, action, exc)
            return
        self.node.outbox.update_transaction(row, "confirmed", tx_hash=event.tx_hash)
        self._record(job, info, event, "finalize" if action == "finalize" else "complete")

    def _claim(self, job: SettlementRecord, info: SessionInfo) -> tuple[Counts, bytes, bytes]:
        """The latest receipt, or the on-chain checkpoint when there is nothing newer to claim
        or the contract has refused our receipt before (never leave the deposit stuck)."""
        receipt = self.node.state.latest_receipt(job.session_id)
        paid = Counts(info.input_tokens_paid, info.output_tokens_paid)
        refused = job.attempts >= REVERTS_BEFORE_FALLBACK and (job.last_error or "").startswith(
            "revert"
        )
        if receipt is None or not receipt.counts.covers(paid) or receipt.counts == paid or refused:
            if receipt is not None and refused:
                log.error(
                    "session %s: the contract refused the receipt for %s/%s input/output tokens "
                    "%s times; settling at the %s/%s already on chain",
                    job.session_id,
                    receipt.input_tokens,
                    receipt.tokens,
                    job.attempts,
                    paid.input,
                    paid.output,
                )
            return paid, info.proof_hash, b""
        return receipt.counts, receipt.proof_hash, receipt.signature

    def _settled_meanwhile(self, job: SettlementRecord) -> bool:
        """After a failure: did someone else (a finalize) settle it? Then record that."""
        try:
            info = self.node.contracts.marketplace.get_session(job.session_id)
        except ChainError:
            return False
        if info.is_settled:
            self._record(job, info, None, "by_others")
            return True
        return False

    def _record(
        self,
        job: SettlementRecord,
        info: SessionInfo,
        event: SettlementEvent | None,
        how: str,
    ) -> None:
        if event is not None:
            paid = Counts(event.input_tokens, event.output_tokens)
            host, fee, refund = event.host_amount, event.fee, event.refund
            credited, tx_hash = event.refund_credited, event.tx_hash
        else:
            paid = Counts(info.input_tokens_paid, info.output_tokens_paid)
            split = info.paid_split()
            host, fee, refund, credited, tx_hash = split.host, split.fee, split.refund, None, None
        tokens = paid.output
        outbox = self.node.outbox
        outbox.finish_settlement(
            job.session_id,
            "settled",
            input_tokens=paid.input,
            tokens=tokens,
            host_amount=host,
            fee=fee,
            refund=refund,
            refund_credited=credited,
            tx_hash=tx_hash,
        )
        outbox.mark_settled_checkpoints(job.session_id, tokens)
        self._publish(job.session_id)
        metrics = self.node.metrics
        metrics.settlements.labels(how=how, reason=job.reason).inc()
        metrics.settlement_seconds.observe(max(0.0, time.time() - job.created_at))
        receipted = self.node.state.get_session(job.session_id)
        unpaid = (receipted.tokens_receipted if receipted else tokens) - tokens
        log.info(
            "session %s: payment distributed (%s, %s): %s input / %s output tokens; host %s, "
            "treasury %s, refund %s USDC%s; tx %s",
            job.session_id,
            how,
            job.reason,
            paid.input,
            tokens,
            format_usdc(host),
            format_usdc(fee),
            format_usdc(refund),
            " (credited for withdrawal)" if credited else "",
            tx_hash or "sent by someone else",
        )
        if unpaid > 0:
            log.error(
                "session %s: %s receipted tokens were not paid (settled at the last on-chain "
                "checkpoint)",
                job.session_id,
                unpaid,
            )

    def _retry(self, job: SettlementRecord, action: str, exc: ChainError) -> None:
        kind = "revert" if isinstance(exc, ContractRevert) else type(exc).__name__
        delay = min(self.settings.settlement_retry_cap, RETRY_BASE_SECONDS * 2**job.attempts)
        error = f"{kind}: {exc}"
        self.node.outbox.retry_settlement(job.session_id, error, time.time() + delay)
        log.warning(
            "session %s: settlement failed at %s (attempt %s): %s; retrying in %.1fs",
            job.session_id,
            action,
            job.attempts + 1,
            " ".join(str(exc).split()),
            delay,
        )

    def _tx_failed(self, row: int, action: str, exc: ChainError) -> None:
        kind = "revert" if isinstance(exc, ContractRevert) else type(exc).__name__
        self.node.metrics.tx_failures.labels(action=action, error=kind).inc()
        self.node.outbox.update_transaction(row, "failed", error=str(exc))

    def _give_up(self, job: SettlementRecord, reason: str) -> None:
        self.node.outbox.finish_settlement(job.session_id, "failed", error=reason)
        self._publish(job.session_id)
        log.error("session %s: settlement failed for good: %s", job.session_id, reason)


    def _publish(self, session_id: int) -> None:
        record = self.node.outbox.settlement(session_id)
        if record is not None:
            self.node.notices.publish(record)


def proof_uri(proof_hash: bytes) -> str:
    """Where a bundle is served, relative to the host's API URL in NodeRegistry."""
    return f"/v1/proofs/0x{proof_hash.hex()}"
