"""Releasing a settled session's paid amount from the host's exposure cap.

What a session paid counts against the host's cap (``exposure_bps`` of its stake) until
its dispute window ends and someone calls ``release_exposure`` (docs/disputes.md). The
host is the one who needs the room back, so its node does it: one transaction per settled
session, once the window has passed and no dispute is open on it.
"""

from __future__ import annotations

import logging

from inferledger.chain.contracts import Contracts
from inferledger.chain.errors import ChainError, ContractRevert
from inferledger.chain.tx import TxSender
from inferledger.node.metrics import NodeMetrics
from inferledger.node.state import NodeState

log = logging.getLogger("inferledger.node")

RETRY_AFTER = 600
"""Seconds of chain time before a session with an open dispute is looked at again."""


class ExposureReleaser:
    """Finds this node's settled sessions past their dispute window and releases them."""

    def __init__(
        self, state: NodeState, contracts: Contracts, sender: TxSender, metrics: NodeMetrics
    ) -> None:
        self.state = state
        self.contracts = contracts
        self.sender = sender
        self.metrics = metrics
        self._window: int | None = None  # fixed at deployment; read at the first step
        self._due: dict[int, int] = {}  # session -> chain time after which to release

    def step(self, chain_now: int) -> list[int]:
        """Release what is due at ``chain_now``; the sessions released."""
        if self._window is None:
            self._window = self.contracts.disputes.dispute_window()
        released = []
        for session_id in self.state.unreleased_sessions():
            due = self._due.get(session_id)
            if due is None:
                facts = self.contracts.marketplace.dispute_facts(session_id)
                if facts.settled_at == 0:
                    continue  # settled in the node's books, not yet as the chain sees it
                due = self._due[session_id] = facts.settled_at + self._window
            if chain_now > due and self._release(session_id, chain_now):
                released.append(session_id)
        return released

    def _release(self, session_id: int, chain_now: int) -> bool:
        disputes = self.contracts.disputes
        if disputes.is_released(session_id):  # someone else did (or a fraud finding)
            self._done(session_id)
            return False
        if disputes.dispute_of_session(session_id):
            self._due[session_id] = chain_now + RETRY_AFTER
            return False
        try:
            disputes.release_exposure(self.sender, session_id)
        except ChainError as exc:
            kind = "revert" if isinstance(exc, ContractRevert) else type(exc).__name__
            self.metrics.tx_failures.labels(action="release_exposure", error=kind).inc()
            log.warning("session %s: cannot release its exposure: %s (retrying)", session_id, exc)
            return False
        self._done(session_id)
        self.metrics.exposure_released.inc()
        log.info("session %s: dispute window over, its paid amount released", session_id)
        return True

    def _done(self, session_id: int) -> None:
        self.state.mark_released(session_id)
        self._due.pop(session_id, None)
