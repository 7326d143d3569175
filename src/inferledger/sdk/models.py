"""Plain result types returned by the SDK. Amounts are integers in token base units
(USDC: 6 decimals; ``format_usdc`` prints them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

SettlementStatus = Literal["settled", "closing"]
SessionState = Literal["open", "closing", "expired", "settled"]


@dataclass(frozen=True)
class HostOffer:
    """An active host serving one model at its prompt (input) and completion (output)
    prices, per million tokens in base units."""

    address: str
    api_url: str
    model_id: bytes
    input_price_per_mtok: int
    output_price_per_mtok: int
    stake: int


@dataclass(frozen=True)
class Settlement:
    """How a session ended, or where it stands if it could not settle yet.

    ``status`` "settled": the amounts are final and ``tx_hash`` is the settling
    transaction. "closing": the node did not settle, so the depositor asked the chain to
    close; the host may still submit its last receipt until ``finalize_after`` (chain
    time), then anyone can ``finalize``. The amounts are what finalizing would pay now.
    ``reported_by`` says who told us: the node's ``settled`` frame (checked against the
    chain) or the chain itself.
    """

    session_id: int
    status: SettlementStatus
    input_tokens: int
    output_tokens: int
    host_amount: int
    fee: int
    refund: int
    refund_credited: bool
    tx_hash: str | None
    reported_by: Literal["node", "chain"]
    finalize_after: int | None = None
    message: str = ""

    @property
    def settled(self) -> bool:
        return self.status == "settled"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SessionStatus:
    """A session as the chain sees it, with the split it pays at its paid counts.

    ``state``: "open"; "closing" (close requested); "expired" (past ``expires_at``, not
    settled); "settled". Until settled, ``host_amount``/``fee``/``refund`` are what a
    settlement at the tokens checkpointed so far would pay.
    """

    session_id: int
    state: SessionState
    depositor: str
    host: str
    model_id: bytes
    deposit: int
    input_price_per_mtok: int
    output_price_per_mtok: int
    fee_bps: int
    proof_interval: int
    input_tokens_paid: int
    output_tokens_paid: int
    checkpoints: int
    created_at: int
    expires_at: int
    close_requested_at: int
    finalize_after: int
    can_finalize: bool
    host_amount: int
    fee: int
    refund: int
    settlement_tx: str | None
    refund_credited: bool | None


@dataclass(frozen=True)
class Withdrawal:
    amount: int
    tx_hash: str
