"""Reconciliation: where the node's books and the chain disagree about a session.

The chain is the authority. ``compare`` is pure: given what the node recorded and what the
chain says, it names each difference and the repair the node can make itself (None when it
cannot). The settlement worker reads the chain, applies the repairs, and logs, counts and
records every finding (``node status`` lists those still open).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from inferledger.chain.contracts import SessionInfo
from inferledger.node.outbox import SettlementRecord
from inferledger.node.state import HostedSession

Kind = Literal[
    "settlement_lost", "settled_on_chain", "paid_differs", "close_missed", "unknown_on_chain"
]
Repair = Literal["settle_again", "record_chain", "stop_and_settle"]

_SUPERSEDED_BY_A_CLOSE = ("disconnect", "restart")
"""Pending settlements a close request should hurry (they wait for a returning client)."""


@dataclass(frozen=True)
class Finding:
    kind: Kind
    detail: str
    repair: Repair | None


def compare(
    record: HostedSession, settlement: SettlementRecord | None, info: SessionInfo
) -> list[Finding]:
    """Every difference between the node's books for one session and the chain's state."""
    if not info.exists:
        return [Finding("unknown_on_chain", "the chain has no such session", None)]
    booked = settlement is not None and settlement.status == "settled"
    paid = (info.input_tokens_paid, info.output_tokens_paid)
    if booked and not info.is_settled:
        assert settlement is not None
        return [
            Finding(
                "settlement_lost",
                f"the books say settled in tx {settlement.tx_hash or '-'}, the chain says open "
                "(a reorganisation or a dropped transaction)",
                "settle_again",
            )
        ]
    if not booked and info.is_settled:
        status = settlement.status if settlement else record.status
        return [
            Finding(
                "settled_on_chain",
                f"the chain says settled at {paid[0]}/{paid[1]} input/output tokens, the books "
                f"say {status}",
                "record_chain",
            )
        ]
    if booked and settlement is not None:
        books = (settlement.input_tokens, settlement.tokens)
        if books != paid:
            return [
                Finding(
                    "paid_differs",
                    f"the books say {books[0]}/{books[1]} input/output tokens paid, the chain "
                    f"{paid[0]}/{paid[1]}",
                    "record_chain",
                )
            ]
    if (
        info.close_requested_at
        and not info.is_settled
        and (
            settlement is None
            or (settlement.status == "pending" and settlement.reason in _SUPERSEDED_BY_A_CLOSE)
        )
    ):
        return [
            Finding(
                "close_missed",
                "the depositor asked to close on chain and the node had not started settling",
                "stop_and_settle",
            )
        ]
    return []
