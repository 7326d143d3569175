"""TxSender nonces heal: rollbacks, a shared key, dropped and stuck transactions, fee caps.

Senders under test come from their own connection, as a node's would, so the
fixture's ``Chain.revert`` never resets them: whatever heals is the sender itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from web3.exceptions import TransactionNotFound
from web3.types import TxReceipt

from inferledger.chain.connect import Chain, connect
from inferledger.chain.devchain import DevWorld, dev_account
from inferledger.chain.errors import FeeCapExceeded, TxDropped
from inferledger.chain.tx import TxSender

POLL_BOUND_SECONDS = 60.0
NO_MEMPOOL = "eth-tester has no transaction pool to drop from or replace in"


def own_sender(world: DevWorld, label: str, **options: Any) -> TxSender:
    """A funded sender for ``label`` on a connection of its own."""
    account = dev_account(label)
    world.chain.fund(account.address, 10**18)
    if world.chain.is_embedded:  # one in-process chain: a sender Chain does not track
        return TxSender(world.chain.w3, account, estimate_block=None, **options)
    return connect(world.chain.url).sender(account, **options)


def unbumpable(world: DevWorld, label: str) -> TxSender:
    """A quick-to-worry sender whose first fee is already its cap, so it never replaces:
    a transaction the test drops stays dropped."""
    sender = own_sender(world, label, stuck_after=0.5)
    sender.max_fee_per_gas = 2 * base_fee(world.chain)
    return sender


def base_fee(chain: Chain) -> int:
    """The latest base fee; read after funding, which mines a block on eth-tester."""
    return int(chain.w3.eth.get_block("latest")["baseFeePerGas"])


def nonce_of(chain: Chain, receipt: TxReceipt) -> int:
    return int(chain.w3.eth.get_transaction(receipt["transactionHash"])["nonce"])


def poll(condition: Callable[[], Any], what: str) -> Any:
    """``condition()``'s first truthy value, polled within a generous bound."""
    deadline = time.monotonic() + POLL_BOUND_SECONDS
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def pooled(chain: Chain, address: str) -> dict[int, dict[str, Any]]:
    """Anvil's pending pool for ``address``, by nonce."""
    content = chain.w3.provider.make_request("txpool_content", [])["result"]
    by_nonce = content["pending"].get(address.lower(), {})
    return {int(nonce): tx for nonce, tx in by_nonce.items()}


class InThread:
    """Runs ``send`` in a thread, keeping its result or exception."""

    def __init__(self, send: Callable[[], TxReceipt]) -> None:
        self.result: TxReceipt | None = None
        self.error: BaseException | None = None
        self.finished_at = 0.0
        self._thread = threading.Thread(target=self._run, args=(send,), daemon=True)
        self._thread.start()

    def _run(self, send: Callable[[], TxReceipt]) -> None:
        try:
            self.result = send()
        except BaseException as exc:
            self.error = exc
        self.finished_at = time.monotonic()

    def join(self) -> None:
        self._thread.join(POLL_BOUND_SECONDS)
        assert not self._thread.is_alive(), "the send never returned"


@contextmanager
def automine_off(chain: Chain) -> Iterator[None]:
    chain.set_automine(False)
    try:
        yield
    finally:
        chain.set_automine(True)


def test_a_send_after_a_rollback_reuses_the_rewound_nonce(world: DevWorld) -> None:
    sender = own_sender(world, "rolled-back")
    snapshot = world.chain.snapshot()
    sender.send_value(world.user.address, 1)
    world.chain.revert(snapshot)  # the key's nonce goes back to 0; the sender is not told
    receipt = sender.send_value(world.user.address, 1)
    assert receipt["status"] == 1
    assert nonce_of(world.chain, receipt) == 0  # not queued behind a gap at nonce 1


def test_a_send_after_another_sender_used_the_key_is_mined(world: DevWorld) -> None:
    sender = own_sender(world, "shared-key")
    sender.send_value(world.user.address, 1)
    other = own_sender(world, "shared-key")  # another process with the same key
    other.send_value(world.user.address, 1)
    other.send_value(world.user.address, 1)
    receipt = sender.send_value(world.user.address, 1)
    assert nonce_of(world.chain, receipt) == 3
    assert world.chain.w3.eth.get_transaction_count(sender.address) == 4


def test_chain_hands_out_one_nonce_book_per_key(world: DevWorld) -> None:
    account = dev_account("one-book")
    plain, patient = world.chain.sender(account), world.chain.sender(account, stuck_after=60)
    assert world.chain.sender(account) is plain
    assert patient.nonces is plain.nonces


def test_a_dropped_transaction_raises_promptly_and_the_next_send_works(
    world: DevWorld,
) -> None:
    if world.chain.is_embedded:
        pytest.skip(NO_MEMPOOL)
    sender = unbumpable(world, "dropped")
    start_nonce = world.chain.w3.eth.get_transaction_count(sender.address)
    with automine_off(world.chain):
        send = InThread(lambda: sender.send_value(world.user.address, 1))
        tx = poll(lambda: pooled(world.chain, sender.address).get(start_nonce), "the tx pooled")
        world.chain.w3.provider.make_request("anvil_dropTransaction", [tx["hash"]])
        dropped_at = time.monotonic()
        send.join()
    assert isinstance(send.error, TxDropped), send.error
    assert "dropped" in str(send.error) and "sent again" in str(send.error)
    assert send.finished_at - dropped_at < sender.receipt_timeout / 2
    receipt = sender.send_value(world.user.address, 1)
    assert nonce_of(world.chain, receipt) == start_nonce


def test_a_stuck_transaction_is_replaced_with_higher_fees(world: DevWorld) -> None:
    if world.chain.is_embedded:
        pytest.skip(NO_MEMPOOL)
    sender = own_sender(world, "stuck", stuck_after=0.5)
    nonce = world.chain.w3.eth.get_transaction_count(sender.address)
    with automine_off(world.chain):
        send = InThread(lambda: sender.send_value(world.user.address, 1))
        first = poll(lambda: pooled(world.chain, sender.address).get(nonce), "the tx pooled")

        def replaced() -> dict[str, Any] | None:
            now = pooled(world.chain, sender.address).get(nonce)
            return now if now and now["hash"] != first["hash"] else None

        poll(replaced, "a replacement at the same nonce")
        world.chain.mine()
        send.join()
    assert send.error is None, send.error
    assert send.result is not None and send.result["status"] == 1
    mined = world.chain.w3.eth.get_transaction(send.result["transactionHash"])
    assert mined["nonce"] == nonce
    first_fee = int(first["maxFeePerGas"], 16)
    assert mined["maxFeePerGas"] >= first_fee + first_fee // 8 + 1
    assert world.chain.w3.eth.get_transaction_count(sender.address) == nonce + 1
    with pytest.raises(TransactionNotFound):
        world.chain.w3.eth.get_transaction(first["hash"])


def test_a_transaction_left_behind_a_rollback_gap_gets_the_gap_filled(
    world: DevWorld,
) -> None:
    if world.chain.is_embedded:
        pytest.skip(NO_MEMPOOL)
    sender = own_sender(world, "gapped", stuck_after=0.5)
    nonce = world.chain.w3.eth.get_transaction_count(sender.address)
    snapshot = world.chain.snapshot()
    sender.send_value(world.user.address, 1)  # mined at `nonce`, then rolled back
    with automine_off(world.chain):
        upper = InThread(lambda: sender.send_value(world.user.address, 2))
        poll(lambda: pooled(world.chain, sender.address).get(nonce + 1), "the second tx pooled")
        world.chain.revert(snapshot)  # anvil keeps the pooled tx, now above a gap
        poll(lambda: pooled(world.chain, sender.address).get(nonce), "the gap filled")
        world.chain.mine()
        upper.join()
    assert upper.error is None, upper.error
    assert upper.result is not None and nonce_of(world.chain, upper.result) == nonce + 1
    assert world.chain.w3.eth.get_transaction_count(sender.address) == nonce + 2


def test_a_fee_cap_below_the_base_fee_names_the_setting(world: DevWorld) -> None:
    capped = own_sender(world, "capped")
    capped.max_fee_per_gas = base_fee(world.chain) - 1
    with pytest.raises(
        FeeCapExceeded, match=r"max_fee_per_gas_gwei \(INFERLEDGER_MAX_FEE_PER_GAS_GWEI\)"
    ):
        capped.send_value(world.user.address, 1)


def test_fees_stay_under_the_cap(world: DevWorld) -> None:
    owner = own_sender(world, "owner")
    owner.max_fee_per_gas = cap = base_fee(world.chain) + 1
    for receipt in (
        world.contracts.token.mint(owner, owner.address, 1),  # fees from build_transaction
        owner.send_value(world.user.address, 1),  # fees from max_priority_fee
    ):
        assert world.chain.w3.eth.get_transaction(receipt["transactionHash"])["maxFeePerGas"] <= cap
