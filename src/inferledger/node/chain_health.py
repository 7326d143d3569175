"""What the settlement worker last saw of the chain, for ``/health``, the metrics and the log.

Two things can be wrong: the RPC endpoint does not answer (reads fail), or it answers but
the node's transactions are not mined (timeouts, dropped transactions). Either is a problem
from the first failure until the next success of the same kind. The reasons name what is
wrong, never the endpoint: its URL may carry an API key.
"""

from __future__ import annotations

import threading
import time
from typing import Literal

from inferledger.chain.errors import ChainError, ChainUnreachable, TxDropped, TxTimeout
from inferledger.node.metrics import NodeMetrics

Problem = Literal["unreachable", "not_mining"]

_WHAT = {
    "unreachable": "the chain RPC does not answer",
    "not_mining": "the node's transactions are not being mined",
}


class ChainHealth:
    """Thread-safe: the worker reports, the server reads."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self._metrics = metrics
        self._lock = threading.Lock()
        self._since: dict[Problem, float] = {}
        self._waiting: dict[Problem, str] = {}
        self._low_gas: str | None = None
        metrics.chain_up.set(1)

    def reachable(self) -> None:
        self._clear("unreachable")

    def mined(self) -> None:
        self._clear("not_mining")

    def failed(self, exc: ChainError, waiting: str) -> Problem | None:
        """Note a failure; ``waiting`` says what waits for the chain (for the reason line).
        Returns the problem it counts as, or None for errors that say nothing about the chain
        (a revert is the contract's answer: the chain is fine)."""
        problem = classify(exc)
        if problem is None:
            return None
        with self._lock:
            if problem not in self._since:
                self._since[problem] = time.time()
                self._metrics.chain_problems.labels(problem=problem).inc()
            self._waiting[problem] = waiting
            self._metrics.chain_up.set(0)
        return problem

    def gas_balance(self, balance: int, minimum: int) -> None:
        """The host's gas balance as last read: below ``minimum`` it is a problem line."""
        with self._lock:
            self._low_gas = (
                None
                if balance >= minimum
                else f"the host's gas balance ({balance} wei) is below min_gas_balance_wei "
                f"({minimum}): settlement transactions may fail; send the host key ETH"
            )

    def problems(self) -> list[str]:
        """One line per current problem: what, since when, and what waits for it."""
        now = time.time()
        with self._lock:
            lines = [
                f"{_WHAT[p]} (for {now - since:.0f}s); {self._waiting.get(p, 'nothing')} waits"
                for p, since in sorted(self._since.items())
            ]
            return lines + ([self._low_gas] if self._low_gas else [])

    @property
    def unreachable(self) -> bool:
        with self._lock:
            return "unreachable" in self._since

    def _clear(self, problem: Problem) -> None:
        with self._lock:
            self._since.pop(problem, None)
            self._waiting.pop(problem, None)
            if not self._since:
                self._metrics.chain_up.set(1)


def classify(exc: ChainError) -> Problem | None:
    if isinstance(exc, ChainUnreachable):
        return "unreachable"
    if isinstance(exc, TxTimeout | TxDropped):
        return "not_mining"
    return None
