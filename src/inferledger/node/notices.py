"""Settlement outcomes, handed from the settlement worker's thread to whoever waits for them.

A connection that ends a session waits here for the worker's word instead of polling the
outbox; the outbox stays the record, this is only the doorbell.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from concurrent.futures import Future

from inferledger.node.outbox import SettlementRecord


class SettlementNotices:
    """Futures per session, resolved with the settlement record once it is final."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: defaultdict[int, list[Future[SettlementRecord]]] = defaultdict(list)

    def watch(self, session_id: int) -> Future[SettlementRecord]:
        """A future for ``session_id``'s next final settlement (settled or failed)."""
        future: Future[SettlementRecord] = Future()
        with self._lock:
            self._waiting[session_id].append(future)
        return future

    def forget(self, session_id: int, future: Future[SettlementRecord]) -> None:
        """Stop waiting (the client left, or the wait timed out)."""
        with self._lock:
            waiting = self._waiting.get(session_id, [])
            if future in waiting:
                waiting.remove(future)
            if not waiting:
                self._waiting.pop(session_id, None)

    def publish(self, record: SettlementRecord) -> None:
        """From the worker: the settlement of ``record.session_id`` is final."""
        with self._lock:
            waiting = self._waiting.pop(record.session_id, [])
        for future in waiting:
            if not future.done():
                future.set_result(record)
