"""Budget arithmetic shared by the node and the client."""

from __future__ import annotations

from inferledger.chain.units import MTOK


def budget_tokens(deposit: int, price_per_mtok: int) -> int:
    """The most tokens whose cost (rounded down, as on chain) fits in ``deposit``."""
    return ((deposit + 1) * MTOK - 1) // price_per_mtok
