"""Opening, resuming and inspecting sessions: ``client.sessions``."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from eth_account import Account

from inferledger.chain.units import cost, format_usdc
from inferledger.sdk import settlement as settle
from inferledger.sdk.errors import SdkError
from inferledger.sdk.hosts import model_id_of
from inferledger.sdk.models import HostOffer, SessionStatus, Settlement, Withdrawal
from inferledger.sdk.records import RecordStore, SessionRecord
from inferledger.sdk.session import Session
from inferledger.sdk.wire import ws_endpoint

if TYPE_CHECKING:
    from inferledger.sdk.client import Client

DEFAULT_DURATION = 86400  # one day
DEFAULT_PROOF_INTERVAL = 100  # tokens; the node asks a final receipt for the tail too
MIN_DURATION = 60  # seconds: JobMarketplace's MIN_DURATION
MAX_DURATION = 30 * 86400  # seconds: JobMarketplace's MAX_DURATION
SHORT_DURATION = 300  # below this, the tenth a node keeps for settling is felt: warn


class ShortSessionWarning(UserWarning):
    """A session so short that the time the node keeps for settling it matters."""


def check_duration(max_duration: int) -> None:
    """Refuse a duration the contract rejects; warn about one that is barely usable.

    A node stops serving a session ``min(settle_before_expiry, duration / 10)`` seconds
    before it expires (docs/protocol.md, "Billing"), so a tenth of a short session goes to
    settling it.
    """
    if max_duration < MIN_DURATION:
        raise SdkError(
            f"max_duration {max_duration}s is below the marketplace's minimum of "
            f"{MIN_DURATION}s: pass max_duration={SHORT_DURATION} or more"
        )
    if max_duration > MAX_DURATION:
        raise SdkError(
            f"max_duration {max_duration}s is above the marketplace's maximum of "
            f"{MAX_DURATION}s (30 days)"
        )
    if max_duration < SHORT_DURATION:
        lead = max_duration // 10
        warnings.warn(
            f"a {max_duration}s session stops taking prompts {lead}s before it expires (the "
            f"node settles a tenth of a session early), so it is usable for "
            f"{max_duration - lead}s; pass max_duration={SHORT_DURATION} or more",
            ShortSessionWarning,
            stacklevel=3,
        )


def _or_default(value: int | None, default: int) -> int:
    return default if value is None else value


class Sessions:
    def __init__(self, client: Client, store: RecordStore) -> None:
        self._client = client
        self.store = store

    def open(
        self,
        host: str | HostOffer,
        model: str | bytes | None,
        deposit: int,
        *,
        max_input_price_per_mtok: int | None = None,
        max_output_price_per_mtok: int | None = None,
        max_duration: int = DEFAULT_DURATION,
        proof_interval: int = DEFAULT_PROOF_INTERVAL,
        url: str | None = None,
    ) -> Session:
        """Deposit ``deposit`` base units with ``host`` for ``model`` and return the session.

        Approves the deposit and creates the session in one call, with a fresh session
        signer key that signs receipts without wallet prompts. ``model`` may be None when
        ``host`` is a ``HostOffer``. The most you accept per million prompt (input) and
        completion (output) tokens default to the host's prices (the session is priced at
        the host's, never above these); ``url`` defaults to the node URL the host
        registered. The local record (signer key, transcript, receipts) is saved before
        this returns.

        ``max_duration`` (seconds) must be at least the contract's 60; below 300 a
        :class:`ShortSessionWarning` says how much of it is usable, since a node stops a
        session a tenth of its duration before it expires, to settle it.
        """
        check_duration(max_duration)
        client = self._client
        c = client.contracts
        if isinstance(host, HostOffer):
            model = host.model_id if model is None else model
            host = host.address
        if model is None:
            raise SdkError("which model? pass a model name or id, or a HostOffer")
        model_id = model_id_of(model)
        info = c.nodes.get_host(host)
        if not info.active:
            raise SdkError(f"host {host} is not active in NodeRegistry {c.nodes.address}")
        host_prices = c.nodes.prices_of(host, model_id)
        if host_prices.output_per_mtok == 0:
            raise SdkError(f"host {host} does not serve model 0x{model_id.hex()}")
        max_in = _or_default(max_input_price_per_mtok, host_prices.input_per_mtok)
        max_out = _or_default(max_output_price_per_mtok, host_prices.output_per_mtok)
        for kind, charged, offered in [
            ("input", host_prices.input_per_mtok, max_in),
            ("output", host_prices.output_per_mtok, max_out),
        ]:
            if offered < charged:
                raise SdkError(
                    f"host {host} charges {charged} per Mtok of {kind} tokens, above your {offered}"
                )
        # The contract counts one proof interval in output tokens at the host's price.
        interval_cost = cost(0, proof_interval, *host_prices)
        if interval_cost > deposit:
            raise SdkError(
                f"a deposit of {format_usdc(deposit)} buys fewer than one proof interval "
                f"({proof_interval} output tokens cost {format_usdc(interval_cost)})"
            )
        node_url = ws_endpoint(url or info.api_url)
        sender = client.sender
        balance = c.token.balance_of(sender.address)
        if balance < deposit:
            raise SdkError(
                f"deposit {format_usdc(deposit)} exceeds the balance {format_usdc(balance)} "
                f"of {sender.address} in token {c.token.address}"
            )
        signer = Account.create()
        start_block = c.chain.block_number()
        if c.token.allowance(sender.address, c.marketplace.address) < deposit:
            c.token.approve(sender, c.marketplace.address, deposit)
        session_id = c.marketplace.create_session(
            sender,
            host=host,
            model_id=model_id,
            deposit=deposit,
            max_input_price_per_mtok=max_in,
            max_output_price_per_mtok=max_out,
            max_duration=max_duration,
            proof_interval=proof_interval,
            session_signer=signer.address,
        )
        terms = c.marketplace.get_session(session_id)  # the prices the session snapshotted
        record = SessionRecord(
            session_id=session_id,
            chain_id=c.chain.chain_id,
            chain_url=c.chain.url,
            marketplace=c.marketplace.address,
            depositor=sender.address,
            host=host,
            model_id="0x" + model_id.hex(),
            deposit=deposit,
            input_price_per_mtok=terms.input_price_per_mtok,
            output_price_per_mtok=terms.output_price_per_mtok,
            proof_interval=proof_interval,
            max_duration=max_duration,
            signer_key="0x" + signer.key.hex(),
            node_url=node_url,
            created_block=start_block,
        )
        self.store.save(record)
        return Session(client, record, self.store)

    def resume(self, session_id: int, *, auto_close: bool = True) -> Session:
        """A session opened earlier (maybe by another process), from its local record.

        Its connection is reopened on the next call, continuing from the node's last
        receipt. With ``auto_close=False`` it is not closed at exit or on a signal: for a
        caller that only settles or inspects it and must not end it by failing.
        """
        c = self._client.contracts
        return Session(
            self._client,
            self.store.load(c.chain.chain_id, c.marketplace.address, session_id),
            self.store,
            auto_close=auto_close,
        )

    def records(self) -> list[SessionRecord]:
        """Local records of this chain's and marketplace's sessions, newest first."""
        c = self._client.contracts
        return self.store.list(c.chain.chain_id, c.marketplace.address)

    def refresh(self, session_id: int) -> SessionRecord:
        """A session's local record, brought up to date with the chain.

        A record not yet settled (left open, or "closing" after ``close()`` fell back to the
        chain) becomes settled, with the amounts of the SessionSettled log, once the chain
        shows the session settled: a node that settled after the client stopped waiting is
        learned this way. Other records are returned as they are.
        """
        c = self._client.contracts
        return self._refreshed(self.store.load(c.chain.chain_id, c.marketplace.address, session_id))

    def refresh_all(self) -> list[SessionRecord]:
        """``refresh`` for every local record of this chain and marketplace, newest first."""
        return [self._refreshed(record) for record in self.records()]

    def _refreshed(self, record: SessionRecord) -> SessionRecord:
        learned = settle.settled_since(self._client.contracts, record)
        if learned is not None:
            record.settlement = learned.as_dict()
            self.store.save(record)
        return record

    def status(self, session_id: int) -> SessionStatus:
        """A session's on-chain state, with the split it pays (or would pay if settled now)."""
        return settle.status(self._client.contracts, session_id)

    def request_close(
        self, session_id: int, *, reason: str = "the node was not asked to settle"
    ) -> Settlement:
        """Ask the chain to close a session without its local record (the depositor only).

        With the record, ``resume(session_id).close()`` asks the node to settle first.
        """
        return settle.request_close(
            self._client, session_id, reason=reason, from_block=self._deploy_block
        )

    def finalize(self, session_id: int) -> Settlement:
        """Settle a session whose close window has passed, without its local record."""
        return settle.finalize(self._client, session_id, from_block=self._deploy_block)

    @property
    def _deploy_block(self) -> int:
        """Where a session without a record may start: its settlement log is after it."""
        return self._client.contracts.deployment.deploy_block

    def refund_credit(self) -> int:
        """Refunds the marketplace could not push to this account (withdraw them)."""
        return self._client.contracts.marketplace.refund_credit(self._client.account.address)

    def withdraw_refund(self) -> Withdrawal:
        amount = self.refund_credit()
        if amount == 0:
            raise SdkError("no credited refund to withdraw")
        receipt = self._client.contracts.marketplace.withdraw_refund(self._client.sender)
        return Withdrawal(amount, receipt["transactionHash"].to_0x_hex())
