"""What the gateway has spent on tokens, per UTC day and in total, kept on disk.

The spend limits protect the user's money across restarts, so the ledger is a file
rewritten atomically after every reply, not a counter in memory. Amounts are token
base units; what is spent is what the session signer signed for (the most the chain
can pay the host), not the deposits, which come back minus that.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from inferledger.chain.units import format_usdc
from inferledger.gateway.errors import budget_exceeded
from inferledger.paths import write_atomic


def today() -> str:
    return datetime.now(UTC).date().isoformat()


@dataclass(frozen=True)
class Limits:
    """The most the gateway may spend (base units); None: no limit."""

    per_day: int | None = None
    total: int | None = None


class SpendLedger:
    """Spend so far, and the check that a request fits the limits before it is sent."""

    def __init__(self, path: Path, limits: Limits) -> None:
        self.path = path
        self.limits = limits
        self._lock = threading.Lock()
        self.total = 0
        self.days: dict[str, int] = {}
        if path.exists():
            saved = json.loads(path.read_text())
            self.total, self.days = int(saved["total"]), dict(saved["days"])

    def spent_today(self) -> int:
        return self.days.get(today(), 0)

    def remaining(self) -> list[tuple[str, int]]:
        """(budget, what it leaves) for each limit set: "daily" and "total"."""
        return [
            (budget, max(limit - spent, 0))
            for budget, limit, spent in (
                ("daily", self.limits.per_day, self.spent_today()),
                ("total", self.limits.total, self.total),
            )
            if limit is not None
        ]

    def tightest(self) -> tuple[str, int] | None:
        """The limit leaving the least, or None without limits."""
        return min(self.remaining(), key=lambda pair: pair[1], default=None)

    def check(self, worst_case: int) -> None:
        """402 when a request costing up to ``worst_case`` could break a limit."""
        for budget, left in self.remaining():
            if worst_case > left:
                setting = "gateway_spend_limit_" + ("day" if budget == "daily" else "total")
                raise budget_exceeded(
                    budget,
                    format_usdc(left),
                    f"the gateway's {budget} spend limit leaves {format_usdc(left)} USDC and "
                    f"this request may cost up to {format_usdc(worst_case)}: raise {setting} "
                    "or ask for fewer tokens (max_tokens)",
                )

    def add(self, amount: int) -> None:
        if amount <= 0:
            return
        with self._lock:
            day = today()
            self.total += amount
            self.days[day] = self.days.get(day, 0) + amount
            write_atomic(self.path, json.dumps({"total": self.total, "days": self.days}).encode())
