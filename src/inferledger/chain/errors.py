"""One family of chain errors, whatever backend raised them.

eth-tester raises ``TransactionFailed``, a JSON-RPC node such as anvil raises
web3's ``ContractLogicError``, and a dead RPC raises a ``requests`` or ``OSError``.
Callers catch ``ChainError`` and print its one-line message.
"""

from __future__ import annotations

import requests
from eth_tester.exceptions import TransactionFailed
from web3.exceptions import ContractLogicError, TimeExhausted

from inferledger.chain.redact import redact_url
from inferledger.config import setting_ref


class ChainError(Exception):
    """A chain operation failed; the message says what and how to fix it."""


class ContractRevert(ChainError):
    """A contract rejected a call; ``reason`` is its revert string."""

    def __init__(self, reason: str, action: str = "") -> None:
        self.reason = reason
        self.action = action
        where = f"{action} reverted" if action else "reverted"
        super().__init__(f"{where}: {reason}")


class ChainUnreachable(ChainError):
    """The JSON-RPC endpoint did not answer."""


class TxTimeout(ChainError):
    """A transaction was sent but no receipt arrived in time."""

    def __init__(self, tx_hash: str, timeout: float, known: bool = True) -> None:
        self.tx_hash = tx_hash
        self.known = known
        outlook = (
            f"it may still land: check it later or raise {setting_ref('tx_receipt_timeout')}"
            if known
            else "the node no longer knows it, so it will not land: send it again"
        )
        super().__init__(f"transaction {tx_hash} not mined within {timeout:.0f}s; {outlook}")


class TxDropped(ChainError):
    """A sent transaction vanished from the node unmined (evicted, replaced, rolled back)."""

    def __init__(self, tx_hash: str, action: str = "") -> None:
        self.tx_hash = tx_hash
        self.action = action
        what = f"{action} transaction" if action else "transaction"
        super().__init__(
            f"{what} {tx_hash} was dropped by the node before it was mined; "
            "it did not land and may be sent again"
        )


class GasCapExceeded(ChainError):
    """The gas estimate is above the configured cap."""


class FeeCapExceeded(ChainError):
    """The chain's gas price is above the configured fee cap."""


_REVERT_PREFIXES = ("execution reverted: ", "execution reverted:", "execution reverted")


def revert_reason(exc: BaseException) -> str | None:
    """The revert string carried by a backend exception, or None if it is not a revert."""
    if isinstance(exc, ContractLogicError):
        message = exc.message or str(exc)
    elif isinstance(exc, TransactionFailed):
        message = str(exc.args[0]) if exc.args else str(exc)
    else:
        return None
    for prefix in _REVERT_PREFIXES:
        if message.startswith(prefix):
            message = message[len(prefix) :]
            break
    return message.strip() or "reverted without a reason"


def translate(exc: BaseException, action: str, url: str) -> ChainError:
    """Map a backend exception to a ChainError, or re-raise it if it is not one we know.

    The message names the endpoint by :func:`redact_url` and never quotes ``exc``: a
    ``requests`` error quotes the full URL, API key included. An HTTP error status (401,
    429, 5xx) counts as unreachable: the endpoint answers, but not with the chain.
    """
    if isinstance(exc, ChainError):
        return exc
    reason = revert_reason(exc)
    if reason is not None:
        return ContractRevert(reason, action)
    endpoint = redact_url(url)
    if isinstance(exc, requests.exceptions.RequestException | ConnectionError | OSError):
        return ChainUnreachable(
            f"cannot reach the chain at {endpoint} during {action} ({type(exc).__name__}): "
            f"is the node running? check the chain URL, {setting_ref('chain_url')}"
        )
    if isinstance(exc, TimeExhausted):
        return ChainError(f"{action} timed out waiting for the chain at {endpoint}")
    raise exc
