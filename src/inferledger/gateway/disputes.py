"""Disputing, once its session settles, a checkpoint the background verification failed
(``gateway_auto_dispute``, off by default: each dispute costs a bond, returned with a reward
only if the jurors find fraud; docs/disputes.md)."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter

from inferledger.gateway.verify import Verifier
from inferledger.sdk import Client, SdkError

log = logging.getLogger("inferledger.gateway")


class AutoDisputes:
    """Opens one dispute per session whose checkpoint failed, after the session settled."""

    def __init__(self, client: Client, verifier: Verifier, registry: CollectorRegistry) -> None:
        self._client = client
        self._verifier = verifier
        self._done: set[int] = set()
        self.opened = Counter(
            "inferledger_gateway_disputes_opened",
            "Disputes the gateway opened on checkpoints that failed verification",
            registry=registry,
        )
        self.failed = Counter(
            "inferledger_gateway_disputes_failed",
            "Disputes the gateway could not open or deliver (retried at the next sweep)",
            registry=registry,
        )

    def sweep(self) -> list[int]:
        """Dispute what is due (blocking: run it in a thread); the dispute ids opened."""
        due = [(s, i) for s, i in self._verifier.failures().items() if s not in self._done]
        opened = []
        for session_id, index in due:
            record = self._client.sessions.refresh(session_id)
            if not record.settlement or record.settlement.get("status") != "settled":
                continue  # disputes judge settled sessions
            try:
                dispute_id = self._client.disputes.open(record, index)
                self._client.disputes.draw(dispute_id)
                refused = [d for d in self._client.disputes.deliver(dispute_id, record) if not d.ok]
            except SdkError as exc:
                self.failed.inc()
                log.warning("session %d: cannot dispute checkpoint %d: %s", session_id, index, exc)
                continue
            self._done.add(session_id)
            self.opened.inc()
            opened.append(dispute_id)
            log.warning(
                "session %d: dispute %d opened on checkpoint %d (host %s)%s",
                session_id,
                dispute_id,
                index,
                record.host,
                f"; {len(refused)} juror(s) refused the evidence" if refused else "",
            )
        return opened
