"""TxSender: sends transactions from one local key, safely from several threads.

Nonces are never cached: before each send the sender reads the chain's pending
nonce and steps over the nonces of its own in-flight transactions that the node
still knows. A rollback, a transaction dropped from the pool or another process
using the key therefore heals on the next send instead of queueing every later
transaction behind a gap. A transaction not mined within ``stuck_after`` seconds
is checked: dropped ones raise ``TxDropped``, ones queued behind a gap get the gap
filled, and the others are re-sent at the same nonce with higher fees.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, cast

from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from hexbytes import HexBytes
from web3 import Web3
from web3.contract.contract import ContractConstructor, ContractFunction
from web3.exceptions import TransactionNotFound
from web3.types import BlockIdentifier, Nonce, TxParams, TxReceipt

from inferledger.chain.errors import (
    ChainError,
    ContractRevert,
    FeeCapExceeded,
    GasCapExceeded,
    TxDropped,
    TxTimeout,
    translate,
)

log = logging.getLogger(__name__)

DEFAULT_GAS_CAP = 8_000_000
DEFAULT_RECEIPT_TIMEOUT = 120.0
DEFAULT_STUCK_AFTER = 15.0
SEND_ATTEMPTS = 3
PLAIN_TRANSFER_GAS = 21_000
# How nodes refuse a nonce, geth/anvil wording then py-evm's, by what it means.
_NONCE_TAKEN = ("nonce too low", "replacement transaction underpriced")
_ALREADY_SENT = ("already known", "already imported")
_NONCE_UNSYNCED = ("nonce too high", "invalid transaction nonce")


@dataclass
class _Flight:
    """One of our transactions not yet mined: its nonce, fields and every hash sent."""

    nonce: int
    tx: dict[str, Any]
    hashes: list[HexBytes] = field(default_factory=list)


class Nonces:
    """The in-flight transactions of one key, shared by all its senders in a process.

    Its lock serialises choosing a nonce and sending, so two threads never pick the
    same one; the chain, not this object, is the record of what is used.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.flights: dict[int, _Flight] = {}

    def reset(self) -> None:
        """Forget the in-flight transactions (a dev-chain revert made them moot)."""
        with self.lock:
            self.flights.clear()

    def release(self, flight: _Flight) -> None:
        """Stop tracking ``flight``, unless its nonce was since reused."""
        with self.lock:
            if self.flights.get(flight.nonce) is flight:
                del self.flights[flight.nonce]


def _refusal(exc: BaseException) -> str | None:
    """Which kind of nonce refusal ``exc`` is ("taken", "sent", "unsynced"), if any."""
    text = str(exc).lower()
    for kind, wordings in (
        ("taken", _NONCE_TAKEN),
        ("sent", _ALREADY_SENT),
        ("unsynced", _NONCE_UNSYNCED),
    ):
        if any(wording in text for wording in wordings):
            return kind
    return None


def _bump(wei: int) -> int:
    """A fee high enough to replace a pending one: geth and anvil want 12.5% more."""
    return wei + wei // 8 + 1


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
        receipt_timeout: float = DEFAULT_RECEIPT_TIMEOUT,
        stuck_after: float = DEFAULT_STUCK_AFTER,
        max_fee_per_gas: int | None = None,
        poll_interval: float = 0.02,
        estimate_block: BlockIdentifier | None = "pending",
        nonces: Nonces | None = None,
    ) -> None:
        self.w3 = w3
        self.account = account
        self.url = url
        self.gas_cap = gas_cap
        self.gas_margin = gas_margin
        self.receipt_timeout = receipt_timeout
        self.stuck_after = stuck_after
        self.max_fee_per_gas = max_fee_per_gas
        self.poll_interval = poll_interval
        # Estimate against the block the transaction lands in: time-bound checks differ
        # from the latest block. None: the node's default (eth-tester takes no block here).
        self.estimate_block = estimate_block
        # Shared with every other sender of this key that Chain.sender made.
        self.nonces = nonces or Nonces()

    @property
    def address(self) -> ChecksumAddress:
        return self.account.address

    def gas_balance(self) -> int:
        """The key's ether balance in wei, which pays for gas."""
        return int(self.w3.eth.get_balance(self.address))

    def transact(self, call: ContractFunction | ContractConstructor, action: str = "") -> TxReceipt:
        """Send a contract call (or deployment) and return its successful receipt."""
        action = action or getattr(call, "fn_name", "deploy")
        # Only the call's data and target are wanted here: placeholders keep web3 from asking
        # the chain for gas, nonce and fees, which ``send`` sets itself.
        placeholders = {"gas": 0, "nonce": Nonce(0), "maxFeePerGas": 0, "maxPriorityFeePerGas": 0}
        try:
            tx = call.build_transaction(
                cast(
                    TxParams,
                    {"from": self.address, "chainId": self.w3.eth.chain_id, **placeholders},
                )
            )
        except Exception as exc:
            raise translate(exc, action, self.url) from exc
        return self.send({k: v for k, v in tx.items() if k not in placeholders}, action)

    def send_value(self, to: str, wei: int) -> TxReceipt:
        """Send plain ether (gas money) to ``to``."""
        return self.send({"to": to, "value": wei}, "send ether")

    def send(self, tx: dict[str, Any], action: str) -> TxReceipt:
        """Estimate, sign, send and wait; a revert raises ``ContractRevert``."""
        tx = {**tx, "from": self.address}
        try:
            self._prepare(tx, action)
            flight = self._send_new(tx, action)
            try:
                receipt = self._wait(flight, action)
            finally:
                self.nonces.release(flight)
        except ChainError:
            raise
        except Exception as exc:
            raise translate(exc, action, self.url) from exc
        if receipt["status"] != 1:
            raise ContractRevert(self._replay_reason(tx, receipt), action)
        return receipt

    # Preparing ---------------------------------------------------------------------

    def _prepare(self, tx: dict[str, Any], action: str) -> None:
        """Fill gas, chain id and fees; everything but the nonce."""
        tx.pop("gasPrice", None)
        # cast: the sender's transactions are plain dicts holding TxParams' keys.
        estimate = self.w3.eth.estimate_gas(cast(TxParams, tx), self.estimate_block)
        if estimate > self.gas_cap:
            raise GasCapExceeded(
                f"{action} needs {estimate} gas, above the cap of {self.gas_cap}; "
                "raise the gas cap setting (INFERLEDGER_GAS_CAP) if this is expected"
            )
        tx["gas"] = min(int(estimate * self.gas_margin), self.gas_cap)
        tx["chainId"] = self.w3.eth.chain_id
        self._price(tx, action)

    def _price(self, tx: dict[str, Any], action: str) -> None:
        """EIP-1559 fees as web3 suggests them (build_transaction already did), capped."""
        base_fee = int(self.w3.eth.get_block("latest").get("baseFeePerGas", 0))
        if "maxFeePerGas" not in tx:
            tx["maxPriorityFeePerGas"] = self.w3.eth.max_priority_fee
            tx["maxFeePerGas"] = 2 * base_fee + tx["maxPriorityFeePerGas"]
        cap = self.max_fee_per_gas
        if cap is None:
            return
        if cap < base_fee:
            raise FeeCapExceeded(
                f"{action} cannot be priced: the chain's base fee is {base_fee / 1e9:.9g} gwei "
                f"per gas, above the fee cap of {cap / 1e9:.9g} gwei; raise the setting "
                "max_fee_per_gas_gwei (INFERLEDGER_MAX_FEE_PER_GAS_GWEI) or wait for cheaper gas"
            )
        tx["maxFeePerGas"] = min(tx["maxFeePerGas"], cap)
        tx["maxPriorityFeePerGas"] = min(tx["maxPriorityFeePerGas"], tx["maxFeePerGas"])

    # Nonces and sending -----------------------------------------------------------

    def _known(self, tx_hash: HexBytes) -> bool:
        """Whether the node has the transaction, pending or mined."""
        try:
            self.w3.eth.get_transaction(tx_hash)
        except TransactionNotFound:
            return False
        return True

    def _still_known(self, flight: _Flight) -> bool:
        return any(self._known(tx_hash) for tx_hash in flight.hashes)

    def _free_nonce(self) -> int:
        """The chain's pending nonce, past our own transactions the node still holds.

        Call with the nonce lock held. A node behind a load balancer may not count our
        latest transaction yet; one that lost it (rollback, eviction) gets its nonce reused.
        """
        nonce = int(self.w3.eth.get_transaction_count(self.address, "pending"))
        while (flight := self.nonces.flights.get(nonce)) and self._still_known(flight):
            nonce += 1
        return nonce

    def _send_raw(self, tx: dict[str, Any]) -> HexBytes:
        signed = self.account.sign_transaction(tx)
        try:
            return HexBytes(self.w3.eth.send_raw_transaction(signed.raw_transaction))
        except Exception as exc:
            if _refusal(exc) == "sent":  # this very transaction is in the pool already
                return HexBytes(signed.hash)
            raise

    def _send_new(self, tx: dict[str, Any], action: str) -> _Flight:
        """Send ``tx`` at a free nonce and track it; retries a nonce someone else took."""
        floor = 0
        with self.nonces.lock:
            for _ in range(SEND_ATTEMPTS):
                nonce = max(self._free_nonce(), floor)
                try:
                    tx_hash = self._send_raw({**tx, "nonce": nonce})
                except Exception as exc:
                    refusal = _refusal(exc)
                    if refusal is None:
                        raise
                    # Taken: another process holds it, so look above. Unsynced: re-read.
                    floor = nonce + 1 if refusal == "taken" else 0
                    continue
                flight = _Flight(nonce, {**tx, "nonce": nonce}, [tx_hash])
                self.nonces.flights[nonce] = flight
                return flight
        raise ChainError(f"{action}: could not find a free nonce for {self.address}")

    # Waiting ----------------------------------------------------------------------

    def _receipt(self, flight: _Flight) -> TxReceipt | None:
        """The receipt of whichever of the flight's hashes was mined, if any."""
        for tx_hash in flight.hashes:
            try:
                return self.w3.eth.get_transaction_receipt(tx_hash)
            except TransactionNotFound:
                continue
        return None

    def _wait(self, flight: _Flight, action: str) -> TxReceipt:
        deadline = time.monotonic() + self.receipt_timeout
        check_at = time.monotonic() + self.stuck_after
        while True:
            receipt = self._receipt(flight)
            if receipt is not None:
                return receipt
            now = time.monotonic()
            if now > deadline:
                known = self._still_known(flight)
                raise TxTimeout(flight.hashes[-1].to_0x_hex(), self.receipt_timeout, known)
            if now > check_at:
                self._unstick(flight, action)
                check_at = time.monotonic() + self.stuck_after
            time.sleep(self.poll_interval)

    def _unstick(self, flight: _Flight, action: str) -> None:
        """Act on a transaction not mined in time: report it dropped, fill a gap or bump it."""
        if not self._still_known(flight):
            raise TxDropped(flight.hashes[-1].to_0x_hex(), action)
        with self.nonces.lock:
            if not self._fill_gap(below=flight.nonce):
                self._replace(flight)

    def _fill_gap(self, below: int) -> bool:
        """Fill unmined nonces under ``below`` that none of our pending transactions holds.

        Call with the nonce lock held. Gaps come from rollbacks and evicted transactions
        whose senders are gone; a transaction above one is never mined otherwise. The
        pending nonce cannot find them: after a rollback anvil still counts what its pool
        holds above the gap. A nonce another process is using refuses the empty
        self-transfer sent to fill it, unless it pays more.
        """
        filled = False
        for nonce in range(self.w3.eth.get_transaction_count(self.address, "latest"), below):
            flight = self.nonces.flights.get(nonce)
            if flight and self._still_known(flight):
                continue
            filler = {"to": self.address, "value": 0, "gas": PLAIN_TRANSFER_GAS}
            filler |= {"chainId": self.w3.eth.chain_id, "from": self.address, "nonce": nonce}
            try:
                self._price(filler, "fill a nonce gap")
                self._send_raw(filler)
            except FeeCapExceeded:
                break  # gas costs more than allowed: keep waiting, the next check retries
            except Exception as exc:
                if _refusal(exc) is None:
                    raise
                continue
            log.warning("nonce %d of %s was missing on chain; filled it", nonce, self.address)
            filled = True
        return filled

    def _replace(self, flight: _Flight) -> None:
        """Re-send ``flight`` at its nonce with bumped fees, unless that passes the fee cap."""
        fees = {
            "maxFeePerGas": _bump(flight.tx["maxFeePerGas"]),
            "maxPriorityFeePerGas": _bump(flight.tx["maxPriorityFeePerGas"]),
        }
        if self.max_fee_per_gas is not None and fees["maxFeePerGas"] > self.max_fee_per_gas:
            return
        bumped = flight.tx | fees
        try:
            tx_hash = self._send_raw(bumped)
        except Exception as exc:
            if _refusal(exc) is None:
                raise
            return  # mined meanwhile, or the node wants more: keep waiting
        log.info(
            "transaction at nonce %d of %s is stuck; re-sent with higher fees as %s",
            flight.nonce,
            self.address,
            tx_hash.to_0x_hex(),
        )
        flight.tx = bumped
        flight.hashes.append(tx_hash)

    def _replay_reason(self, tx: dict[str, Any], receipt: TxReceipt) -> str:
        """Why a mined transaction failed, by replaying it at its block."""
        call = {k: tx[k] for k in ("from", "to", "data", "value") if k in tx}
        try:
            self.w3.eth.call(cast(TxParams, call), receipt["blockNumber"])
        except Exception as exc:
            reason = translate(exc, "replay", self.url)
            if isinstance(reason, ContractRevert):
                return reason.reason
        return f"transaction {receipt['transactionHash'].to_0x_hex()} failed on chain"
