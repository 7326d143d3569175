"""TxSender: sends transactions from one local key, safely from several threads.

One sender per key owns that key's nonces: it hands them out under a lock, and
resynchronises from the chain when a node says a nonce is already used (another
process sent with the same key) or after a dev-chain snapshot is reverted.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from web3 import Web3
from web3.contract.contract import ContractConstructor, ContractFunction
from web3.types import TxReceipt

from inferledger.chain.errors import (
    ChainError,
    ContractRevert,
    GasCapExceeded,
    TxTimeout,
    translate,
)
from inferledger.config import setting_ref

DEFAULT_GAS_CAP = 8_000_000
DEFAULT_TX_RECEIPT_TIMEOUT = 120.0
# How nodes say "that nonce is taken": geth/anvil wording, then py-evm's.
_NONCE_ERRORS = (
    "nonce too low",
    "already known",
    "replacement transaction underpriced",
    "invalid transaction nonce",
)


class TxSender:
    """Signs and sends transactions for ``account`` and waits for their receipts."""

    def __init__(
        self,
        w3: Web3,
        account: LocalAccount,
        *,
        url: str = "embedded",
        gas_cap: int = DEFAULT_GAS_CAP,
        gas_margin: float = 1.25,
        tx_receipt_timeout: float = DEFAULT_TX_RECEIPT_TIMEOUT,
        poll_interval: float = 0.02,
        estimate_block: str | None = "pending",
    ) -> None:
        self.w3 = w3
        self.account = account
        self.url = url
        self.gas_cap = gas_cap
        self.gas_margin = gas_margin
        self.tx_receipt_timeout = tx_receipt_timeout
        self.poll_interval = poll_interval
        # Estimate against the block the transaction lands in: time-bound checks differ
        # from the latest block. None: the node's default (eth-tester takes no block here).
        self.estimate_block = estimate_block
        self._lock = threading.Lock()
        self._next_nonce: int | None = None

    @property
    def address(self) -> str:
        return self.account.address

    def reset_nonce(self) -> None:
        """Forget the cached nonce; the next send reads it from the chain."""
        with self._lock:
            self._next_nonce = None

    def transact(self, call: ContractFunction | ContractConstructor, action: str = "") -> TxReceipt:
        """Send a contract call (or deployment) and return its successful receipt."""
        action = action or getattr(call, "fn_name", "deploy")
        try:
            tx = call.build_transaction({"from": self.address, "gas": 0, "nonce": 0})
        except Exception as exc:
            raise translate(exc, action, self.url) from exc
        tx.pop("gas", None)
        tx.pop("nonce", None)
        return self.send(dict(tx), action)

    def send_value(self, to: str, wei: int) -> TxReceipt:
        """Send plain ether (gas money) to ``to``."""
        return self.send({"to": to, "value": wei}, "send ether")

    def send(self, tx: dict[str, Any], action: str) -> TxReceipt:
        """Estimate, sign, send and wait; a revert raises ``ContractRevert``."""
        tx = {**tx, "from": self.address}
        try:
            with self._lock:
                tx_hash = self._sign_and_send(tx, action)
            receipt = self._wait(tx_hash)
        except ChainError:
            raise
        except Exception as exc:
            raise translate(exc, action, self.url) from exc
        if receipt["status"] != 1:
            raise ContractRevert(self._replay_reason(tx, receipt), action)
        return receipt

    def _sign_and_send(self, tx: dict[str, Any], action: str) -> HexBytes:
        tx.pop("gasPrice", None)
        estimate = self.w3.eth.estimate_gas(tx, self.estimate_block)
        if estimate > self.gas_cap:
            raise GasCapExceeded(
                f"{action} needs {estimate} gas, above the cap of {self.gas_cap}; "
                f"raise the gas cap, {setting_ref('gas_cap')}, if this is expected"
            )
        tx["gas"] = min(int(estimate * self.gas_margin), self.gas_cap)
        tx["chainId"] = self.w3.eth.chain_id
        priority = self.w3.eth.max_priority_fee
        base_fee = self.w3.eth.get_block("latest").get("baseFeePerGas", 0)
        tx["maxPriorityFeePerGas"] = priority
        tx["maxFeePerGas"] = 2 * base_fee + priority
        for attempt in range(3):
            if self._next_nonce is None:
                self._next_nonce = self.w3.eth.get_transaction_count(self.address, "pending")
            tx["nonce"] = self._next_nonce
            signed = self.account.sign_transaction(tx)
            try:
                tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
            except Exception as exc:
                if attempt < 2 and any(text in str(exc).lower() for text in _NONCE_ERRORS):
                    # Someone else used this nonce: re-read it and try again.
                    self._next_nonce = None
                    continue
                raise
            self._next_nonce += 1
            return tx_hash
        raise ChainError(f"{action}: could not find a free nonce for {self.address}")

    def _wait(self, tx_hash: HexBytes) -> TxReceipt:
        deadline = time.monotonic() + self.tx_receipt_timeout
        while True:
            try:
                return self.w3.eth.get_transaction_receipt(tx_hash)
            except Exception as exc:
                if "not found" not in str(exc).lower() and "unknown" not in str(exc).lower():
                    raise
            if time.monotonic() > deadline:
                raise TxTimeout(tx_hash.to_0x_hex(), self.tx_receipt_timeout)
            time.sleep(self.poll_interval)

    def _replay_reason(self, tx: dict[str, Any], receipt: TxReceipt) -> str:
        """Why a mined transaction failed, by replaying it at its block."""
        call = {k: tx[k] for k in ("from", "to", "data", "value") if k in tx}
        try:
            self.w3.eth.call(call, receipt["blockNumber"])
        except Exception as exc:
            reason = translate(exc, "replay", self.url)
            if isinstance(reason, ContractRevert):
                return reason.reason
        return f"transaction {receipt['transactionHash'].to_0x_hex()} failed on chain"
