"""Money arithmetic, mirrored exactly from JobMarketplace so clients can predict it.

Prices are per million tokens in token base units; USDC has 6 decimals.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import NamedTuple

USDC_DECIMALS = 6
USDC = 10**USDC_DECIMALS
MTOK = 1_000_000
BPS = 10_000


def usdc(amount: str | int | Decimal) -> int:
    """Base units for a human USDC amount: ``usdc("0.36") == 360_000``."""
    scaled = Decimal(str(amount)) * USDC
    if scaled != scaled.to_integral_value():
        raise ValueError(f"{amount} USDC has more than {USDC_DECIMALS} decimals")
    return int(scaled)


def format_usdc(base_units: int) -> str:
    """``360_000 -> "0.360000"``: six decimals, never float rounding."""
    sign = "-" if base_units < 0 else ""
    whole, frac = divmod(abs(base_units), USDC)
    return f"{sign}{whole}.{frac:06d}"


def price_per_token_to_mtok(price_per_token: str | Decimal) -> int:
    """``"0.002"`` USDC per token -> base units per million tokens (2_000_000_000)."""
    return usdc(Decimal(str(price_per_token)) * MTOK)


class Prices(NamedTuple):
    """A host's prices for one model, per million tokens in base units: prompt tokens
    (input, may be 0) and completion tokens (output, nonzero for a served model).

    A tuple, so ``(input, output)`` pairs and ``Prices`` are interchangeable.
    """

    input_per_mtok: int
    output_per_mtok: int


def cost(
    input_tokens: int, output_tokens: int, input_price_per_mtok: int, output_price_per_mtok: int
) -> int:
    """What the tokens cost, rounded down once over the sum, exactly like the contract."""
    return (input_tokens * input_price_per_mtok + output_tokens * output_price_per_mtok) // MTOK


@dataclass(frozen=True)
class Split:
    """How a settled deposit is divided; ``host + fee + refund == deposit``."""

    gross: int
    fee: int
    host: int
    refund: int


def settlement_split(
    deposit: int,
    input_tokens: int,
    output_tokens: int,
    input_price_per_mtok: int,
    output_price_per_mtok: int,
    fee_bps: int,
) -> Split:
    """The contract's settlement formula, for predictions and checks."""
    gross = cost(input_tokens, output_tokens, input_price_per_mtok, output_price_per_mtok)
    if gross > deposit:
        raise ValueError(
            f"{input_tokens} input and {output_tokens} output tokens cost {gross}, "
            f"more than the deposit {deposit}"
        )
    fee = gross * fee_bps // BPS
    return Split(gross=gross, fee=fee, host=gross - fee, refund=deposit - gross)
