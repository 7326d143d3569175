"""The settlement worker: turns the outbox into transactions until every session is paid out.

It runs in its own thread beside the server and reads only the durable outbox, so a node
killed at any point picks up where it stopped. It settles a session

- when the client sends ``end`` (at once),
- when the client disconnects without ``end`` (after ``disconnect_grace`` seconds),
- shortly before the session expires (``settle_before_expiry``, at most a tenth of the
  session's length),
- when the depositor calls ``request_close`` (within the close window), also for a session
  the node never served (at the tokens already on chain),
- when a client keeps leaving without signing for what it was sent (``max_unpaid_resumes``),
- after a restart, every session left open or ended.

A session with a live connection is not settled under it: the connection is asked to stop
(``Node.request_stop``), collects the final receipt and then schedules the settlement itself;
the worker's own schedule is the fallback if it does not within the receipt timeout.

The chain, not the node's memory, says what happened: close requests and settlements come
from the marketplace's logs (``watcher.py``); a settlement counts as final only under
``confirmations`` blocks, and until then the session is re-read each poll; one the chain lost
(a reorganisation, a dropped transaction) is settled again. The reconciler (``reconciler.py``)
compares the books with the chain at start, after a reorganisation and every
``reconcile_interval`` seconds, and repairs what it can.

RPC errors, timeouts, nonce conflicts and underpriced gas are retried with exponential backoff
up to ``settlement_retry_cap``; while the chain does not answer or mine, ``/health`` says so
(``chain_health.py``). A receipt the contract keeps refusing is dropped for the last
one already on chain, and after the deadline the worker calls ``finalize``: a deposit never
stays locked because of the host (docs/architecture.md, R1).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from inferledger.chain.contracts import Contracts, SessionInfo, SettlementEvent
from inferledger.chain.errors import ChainError, ContractRevert, translate
from inferledger.chain.tx import TxSender
from inferledger.chain.units import format_usdc
from inferledger.config import Settings
from inferledger.node.chain_health import ChainHealth
from inferledger.node.exposure import ExposureReleaser
from inferledger.node.metering import Counts, settle_lead
from inferledger.node.metrics import NodeMetrics
from inferledger.node.notices import SettlementNotices
from inferledger.node.outbox import CheckpointStatus, Outbox, SettlementReason, SettlementRecord
from inferledger.node.reconciler import Finding, compare
from inferledger.node.state import HostedSession, NodeState, session_record
from inferledger.node.threads import name_os_thread
from inferledger.node.watcher import ChainWatcher, Poll

log = logging.getLogger("inferledger.node")

RETRY_BASE_SECONDS = 0.5
REVERTS_BEFORE_FALLBACK = 2
"""Attempts whose receipt the contract refused before settling at the on-chain checkpoint."""
STOP_MARGIN_SECONDS = 5.0
"""Beyond the receipt timeout: how long a stopping connection has before the worker settles."""
RESCAN_BLOCKS = 64
"""How far below its cursor the watcher rescans after a reorganisation (at least)."""

StopLive = Callable[[int, SettlementReason], bool]
"""Ask a session's live connection to stop and settle; False when none is live."""


class SettlementWorker:
    """One thread per node; ``wake()`` after writing to the outbox to act at once."""

    def __init__(
        self,
        settings: Settings,
        *,
        state: NodeState,
        contracts: Contracts,
        sender: TxSender,
        metrics: NodeMetrics,
        notices: SettlementNotices,
        health: ChainHealth,
        stop_live: StopLive,
        confirmations: int,
    ) -> None:
        self.settings = settings
        self.state = state
        self.outbox = Outbox(state)
        self.contracts = contracts
        self.market = contracts.marketplace
        self.sender = sender
        self.metrics = metrics
        self.notices = notices
        self.health = health
        self.stop_live = stop_live
        self.confirmations = confirmations
        self.watcher = ChainWatcher(
            self.market,
            state,
            start_block=contracts.deployment.deploy_block,
            rescan_depth=max(RESCAN_BLOCKS, confirmations),
        )
        self.exposure = ExposureReleaser(state, contracts, sender, metrics)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_chain_poll = 0.0
        self._next_reconcile = 0.0
        self._reconcile_all = True  # at start: every session the node has books for

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
        name_os_thread()
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
        grace = self.settings.disconnect_grace
        for record in self.state.held_sessions():
            if self.outbox.settlement(record.session_id) is None:
                due = time.time() + (grace if record.status == "open" else 0)
                self.outbox.schedule_settlement(record.session_id, "restart", due)
                log.info(
                    "session %s: found %s after a restart; settlement due in %.0fs",
                    record.session_id,
                    record.status,
                    max(0.0, due - time.time()),
                )

    def run_once(self) -> None:
        """Submit queued checkpoints, settle what is due, watch the chain and reconcile."""
        self._submit_checkpoints()
        for job in self.outbox.due_settlements(time.time()):
            if self._stop.is_set():
                return
            self.settle(job)
        if time.monotonic() >= self._next_chain_poll:
            self._next_chain_poll = time.monotonic() + self.settings.chain_poll_interval
            self._poll_chain()
        if time.monotonic() >= self._next_reconcile:
            self.reconcile()

    # Watching the chain -----------------------------------------------------------------

    def _poll_chain(self) -> None:
        try:
            poll = self.watcher.poll()
            self.health.reachable()
            for event in poll.events:
                if event.name == "CloseRequested":
                    self._close_requested(event.session_id)
                else:
                    self._ended_on_chain(event.session_id)
            self._expiries(poll.timestamp)
            self._confirm(poll)
            self.exposure.step(poll.timestamp)
        except ChainError as exc:
            self._chain_failed(exc, "watching the chain")
            return
        self.watcher.advance(poll)
        if poll.reorganised:
            self._reconcile_all, self._next_reconcile = True, 0.0

    def _close_requested(self, session_id: int) -> None:
        record = self.state.get_session(session_id)
        if record is None:
            self._adopt(session_id)
        elif record.status not in ("settled", "failed"):
            self._stop_and_settle(session_id, "close_requested")

    def _adopt(self, session_id: int) -> None:
        """A close request for a session this node never served: settle it at what the chain
        already holds, so the depositor need not wait out the close window. Not at once:
        another node of the same host may have served it and hold newer receipts."""
        info = self.market.get_session(session_id)
        if info.host.lower() != self.sender.address.lower() or not info.is_open:
            return
        self.state.upsert_session(session_record(info))
        delay = self.settings.adopt_after
        log.info(
            "session %s: the depositor asked to close a session this node never served; "
            "settling it in %.0fs (adopt_after) at the %s/%s input/output tokens on chain, "
            "unless a node that served it settles first",
            session_id,
            delay,
            info.input_tokens_paid,
            info.output_tokens_paid,
        )
        self.outbox.schedule_settlement(session_id, "close_requested", time.time() + delay)

    def _ended_on_chain(self, session_id: int) -> None:
        """A SessionSettled log: record it for a session the books still hold open."""
        record = self.state.get_session(session_id)
        if record is not None and record.status not in ("settled", "failed"):
            self._stop_and_settle(session_id, "chain")

    def _expiries(self, chain_now: int) -> None:
        """Sessions whose expiry is near, from the books (no chain call per session)."""
        configured = self.settings.settle_before_expiry
        for record in self.state.held_sessions():
            lead = (
                configured
                if record.starts_at is None
                else settle_lead(configured, record.expires_at - record.starts_at)
            )
            if chain_now >= record.expires_at - lead:
                self._stop_and_settle(record.session_id, "expiry")

    def _stop_and_settle(self, session_id: int, reason: SettlementReason) -> None:
        """Settle now, or, with a live connection, once it has stopped and collected the
        final receipt (it schedules that itself; this schedule is the fallback)."""
        existing = self.outbox.settlement(session_id)
        if existing is not None and (existing.status != "pending" or existing.reason == reason):
            return  # settled, or already due for this reason (an adopted one keeps its delay)
        log.info("session %s: %s; stopping and settling", session_id, reason.replace("_", " "))
        due = time.time()
        if self.stop_live(session_id, reason):
            due += self.settings.user_receipt_timeout + STOP_MARGIN_SECONDS
        self.outbox.schedule_settlement(session_id, reason, due)

    # Confirmation and reconciliation ----------------------------------------------------

    def _confirm(self, poll: Poll) -> None:
        """Re-read each settlement not yet under ``confirmations`` blocks; one the chain lost
        is settled again, one deep enough is final."""
        for settlement in self.outbox.unconfirmed_settlements():
            record = self.state.get_session(settlement.session_id)
            if record is None:
                continue
            info = self.market.get_session(settlement.session_id)
            if self._apply(record, settlement, info):
                continue
            depth = poll.head - (settlement.block_number or poll.head) + 1
            if depth >= self.confirmations:
                self.outbox.confirm_settlement(settlement.session_id)
                log.info(
                    "session %s: settlement confirmed (%s blocks deep)",
                    settlement.session_id,
                    depth,
                )

    def reconcile(self) -> int:
        """Compare the books with the chain; returns how many differences it found.

        At start and after a reorganisation: every session in the books; otherwise the ones
        the node still holds or has not confirmed."""
        self._next_reconcile = time.monotonic() + self.settings.reconcile_interval
        everything, self._reconcile_all = self._reconcile_all, False
        records = self.state.list_sessions() if everything else self._unfinished()
        found = 0
        try:
            balance = self.contracts.chain.w3.eth.get_balance(self.sender.address)
            self.health.gas_balance(balance, self.settings.min_gas_balance_wei)
            for record in records:
                settlement = self.outbox.settlement(record.session_id)
                info = self.market.get_session(record.session_id)
                found += self._apply(record, settlement, info)
        except Exception as exc:
            self._chain_failed(
                translate(exc, "reconcile", self.contracts.chain.url), "reconciliation"
            )
            self._reconcile_all = everything
            self._next_reconcile = 0.0 if everything else self._next_reconcile
        return found

    def _unfinished(self) -> Iterable[HostedSession]:
        unconfirmed = {s.session_id for s in self.outbox.unconfirmed_settlements()}
        for record in self.state.list_sessions():
            if record.status in ("open", "ended") or record.session_id in unconfirmed:
                yield record

    def _apply(
        self, record: HostedSession, settlement: SettlementRecord | None, info: SessionInfo
    ) -> int:
        """Log, count, record and repair each difference of one session; returns how many."""
        findings = compare(record, settlement, info)
        if not findings:
            self.state.resolve_discrepancies(record.session_id)
            return 0
        for finding in findings:
            self._report(record.session_id, finding)
            self._repair(record.session_id, finding, info)
        return len(findings)

    def _report(self, session_id: int, finding: Finding) -> None:
        repaired = finding.repair is not None
        if self.state.note_discrepancy(session_id, finding.kind, finding.detail, repaired):
            self.metrics.discrepancies.labels(kind=finding.kind).inc()
            log.warning(
                "reconcile: session %s: %s: %s; %s",
                session_id,
                finding.kind.replace("_", " "),
                finding.detail,
                {
                    "settle_again": "settling it again",
                    "record_chain": "taking the chain's figures",
                    "stop_and_settle": "settling it now",
                    None: "the node cannot repair this",
                }[finding.repair],
            )

    def _repair(self, session_id: int, finding: Finding, info: SessionInfo) -> None:
        if finding.repair == "settle_again":
            self.outbox.reopen_settlement(session_id, f"settling again: {finding.detail}")
            self.wake()
        elif finding.repair == "record_chain":
            job = self.outbox.settlement(session_id) or self.outbox.schedule_settlement(
                session_id, "chain", time.time()
            )
            self._record(job, info, None, "reconciled")
        elif finding.repair == "stop_and_settle":
            self._stop_and_settle(session_id, "close_requested")

    def _chain_failed(self, exc: ChainError, waiting: str) -> None:
        problem = self.health.failed(exc, waiting)
        log.warning(
            "settlement worker: %s waits for the chain (%s); will retry",
            waiting,
            problem.replace("_", " ") if problem else " ".join(str(exc).split()),
        )

    # Checkpoints on chain ---------------------------------------------------------------

    def _submit_checkpoints(self) -> None:
        outbox, market = self.outbox, self.market
        for checkpoint in outbox.checkpoints_with_status("queued"):
            sid = checkpoint.session_id
            receipt = self.state.latest_receipt(sid)
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
                status: CheckpointStatus = "failed" if isinstance(exc, ContractRevert) else "queued"
                outbox.set_checkpoint_status(
                    sid, checkpoint.token_end, status, error=str(exc), attempted=True
                )
                self._chain_failed(exc, f"checkpoint {checkpoint.idx} of session {sid}")
                continue
            self.health.mined()
            tx_hash = tx["transactionHash"].to_0x_hex()
            outbox.update_transaction(row, "confirmed", tx_hash=tx_hash)
            outbox.set_checkpoint_status(
                sid, checkpoint.token_end, "confirmed", tx_hash=tx_hash, attempted=True
            )
            self.metrics.checkpoints.labels(state="confirmed").inc()
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
        market = self.market
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
            if self.contracts.chain.now() >= deadline:
                action = "finalize"
                row = self.outbox.start_transaction(sid, action)
                event = market.finalize(self.sender, sid)
            else:
                counts, proof_hash, signature = self._claim(job, info)
                row = self.outbox.start_transaction(sid, action)
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
        self.health.reachable()
        self.health.mined()
        self.outbox.update_transaction(row, "confirmed", tx_hash=event.tx_hash)
        self._record(job, info, event, "finalize" if action == "finalize" else "complete")

    def _claim(self, job: SettlementRecord, info: SessionInfo) -> tuple[Counts, bytes, bytes]:
        """The latest receipt, or the on-chain checkpoint when there is nothing newer to claim
        or the contract has refused our receipt before (never leave the deposit stuck)."""
        receipt = self.state.latest_receipt(job.session_id)
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
            info = self.market.get_session(job.session_id)
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
        tx_hash: str | None
        if event is not None:
            paid = Counts(event.input_tokens, event.output_tokens)
            host, fee, refund = event.host_amount, event.fee, event.refund
            credited, tx_hash, block = event.refund_credited, event.tx_hash, event.block_number
        else:
            paid = Counts(info.input_tokens_paid, info.output_tokens_paid)
            split = info.paid_split()
            host, fee, refund = split.host, split.fee, split.refund
            credited, tx_hash, block = None, job.tx_hash if how == "reconciled" else None, None
        tokens = paid.output
        outbox = self.outbox
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
            block_number=block,
            # Read back from the chain, or one block is all the node asks for: final now.
            confirmed=event is None or self.confirmations <= 1,
        )
        outbox.mark_settled_checkpoints(job.session_id, tokens)
        self._publish(job.session_id)
        self.metrics.settlements.labels(how=how, reason=job.reason).inc()
        self.metrics.settlement_seconds.observe(max(0.0, time.time() - job.created_at))
        receipted = self.state.get_session(job.session_id)
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
                "checkpoint); `inferledger node status` lists it",
                job.session_id,
                unpaid,
            )

    def _retry(self, job: SettlementRecord, action: str, exc: ChainError) -> None:
        kind = "revert" if isinstance(exc, ContractRevert) else type(exc).__name__
        delay = min(self.settings.settlement_retry_cap, RETRY_BASE_SECONDS * 2**job.attempts)
        error = f"{kind}: {exc}"
        self.outbox.retry_settlement(job.session_id, error, time.time() + delay)
        problem = self.health.failed(exc, f"the settlement of session {job.session_id}")
        log.warning(
            "session %s: settlement failed at %s (attempt %s)%s: %s; retrying in %.1fs",
            job.session_id,
            action,
            job.attempts + 1,
            f", waiting for the chain ({problem.replace('_', ' ')})" if problem else "",
            " ".join(str(exc).split()),
            delay,
        )

    def _tx_failed(self, row: int, action: str, exc: ChainError) -> None:
        kind = "revert" if isinstance(exc, ContractRevert) else type(exc).__name__
        self.metrics.tx_failures.labels(action=action, error=kind).inc()
        self.outbox.update_transaction(row, "failed", error=str(exc))

    def _give_up(self, job: SettlementRecord, reason: str) -> None:
        self.outbox.finish_settlement(job.session_id, "failed", error=reason)
        self._publish(job.session_id)
        log.error("session %s: settlement failed for good: %s", job.session_id, reason)

    def _publish(self, session_id: int) -> None:
        record = self.outbox.settlement(session_id)
        if record is not None:
            self.notices.publish(record)


def proof_uri(proof_hash: bytes) -> str:
    """Where a bundle is served, relative to the host's API URL in NodeRegistry."""
    return f"/v1/proofs/0x{proof_hash.hex()}"
