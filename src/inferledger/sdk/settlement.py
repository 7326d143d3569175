"""Reading how a session ended (or stands) from the chain, and from the node's report.

The node's ``settled`` frame is a convenience; the chain is the authority, so every
Settlement the SDK returns has been checked against ``get_session``.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import TYPE_CHECKING

from inferledger.chain.contracts import Contracts, SessionInfo, SettlementEvent
from inferledger.chain.errors import ChainError, ContractRevert
from inferledger.protocol.server import Settled
from inferledger.sdk.errors import SdkError
from inferledger.sdk.models import SessionState, SessionStatus, Settlement, SettlementStatus

if TYPE_CHECKING:
    from inferledger.sdk.client import Client
    from inferledger.sdk.records import SessionRecord

CHAIN_RETRY_PAUSE = 0.25  # seconds between chain reads retried while waiting on the chain


def from_event(event: SettlementEvent) -> Settlement:
    return Settlement(
        session_id=event.session_id,
        status="settled",
        input_tokens=event.input_tokens,
        output_tokens=event.output_tokens,
        host_amount=event.host_amount,
        fee=event.fee,
        refund=event.refund,
        refund_credited=event.refund_credited,
        tx_hash=event.tx_hash,
        reported_by="chain",
    )


def from_frame(frame: Settled, message: str = "") -> Settlement:
    """The node's ``settled`` frame (call only after the chain confirmed the settlement)."""
    return Settlement(
        session_id=frame.session_id,
        status="settled",
        input_tokens=frame.input_tokens,
        output_tokens=frame.output_tokens,
        host_amount=frame.host_amount,
        fee=frame.fee,
        refund=frame.refund,
        refund_credited=bool(frame.refund_credited),
        tx_hash=frame.tx_hash,
        reported_by="node",
        message=message,
    )


def frame_matches_chain(frame: Settled, info: SessionInfo) -> bool:
    """The node's figures are the contract's settlement of this session."""
    counts = (frame.input_tokens, frame.output_tokens)
    if not info.is_settled or counts != (info.input_tokens_paid, info.output_tokens_paid):
        return False
    split = info.paid_split()
    return (frame.host_amount, frame.fee, frame.refund) == (split.host, split.fee, split.refund)


def settled_from_chain(contracts: Contracts, info: SessionInfo, from_block: int) -> Settlement:
    """A settled session's Settlement: from its SessionSettled log, else from its state."""
    event = contracts.marketplace.settlement_event(info.session_id, from_block)
    if event is not None:
        return from_event(event)
    return from_state(
        info,
        status="settled",
        message="settlement log not found; amounts computed from the session's state",
    )


def from_state(
    info: SessionInfo,
    *,
    status: SettlementStatus,
    message: str,
    tx_hash: str | None = None,
    finalize_after: int | None = None,
) -> Settlement:
    """What settling at the session's on-chain checkpoint pays (the contract's formula)."""
    split = info.paid_split()
    return Settlement(
        session_id=info.session_id,
        status=status,
        input_tokens=info.input_tokens_paid,
        output_tokens=info.output_tokens_paid,
        host_amount=split.host,
        fee=split.fee,
        refund=split.refund,
        refund_credited=False,
        tx_hash=tx_hash,
        reported_by="chain",
        finalize_after=finalize_after,
        message=message,
    )


def require_session(contracts: Contracts, session_id: int) -> SessionInfo:
    info = contracts.marketplace.get_session(session_id)
    if not info.exists:
        raise SdkError(
            f"session {session_id} does not exist on marketplace "
            f"{contracts.marketplace.address} (chain id {contracts.chain.chain_id})"
        )
    return info


def read_session(
    contracts: Contracts, session_id: int, *, until: float = 0.0, settled: bool = False
) -> SessionInfo:
    """``get_session`` of an existing session, retried on chain errors until the monotonic
    time ``until`` (an RPC briefly down must not decide how a session ends), and with
    ``settled`` also while the session is not settled yet (an RPC endpoint lagging behind
    the node's). The last error is raised if the chain never answered."""
    while True:
        try:
            info = require_session(contracts, session_id)
        except ChainError:
            if time.monotonic() >= until:
                raise
        else:
            if info.is_settled or not settled or time.monotonic() >= until:
                return info
        time.sleep(CHAIN_RETRY_PAUSE)


def settled_since(contracts: Contracts, record: SessionRecord) -> Settlement | None:
    """The settlement of a session its record does not show settled, if the chain now
    shows one (a node that settled after the client stopped waiting); else None."""
    if record.settlement is not None and record.settlement["status"] == "settled":
        return None
    info = require_session(contracts, record.session_id)
    return settled_from_chain(contracts, info, record.created_block) if info.is_settled else None


def request_close(
    client: Client, session_id: int, *, reason: str, from_block: int, until: float = 0.0
) -> Settlement:
    """The depositor's way out when the node did not settle (R1): ask the chain to close.

    Returns the "closing" Settlement (``finalize`` settles after its ``finalize_after``),
    or the settled one if the session is settled already or the node settled meanwhile.
    ``reason`` says why the node did not settle; ``from_block`` bounds the log search;
    the first chain read is retried until the monotonic time ``until``.
    """
    contracts = client.contracts
    market = contracts.marketplace
    info = read_session(contracts, session_id, until=until)
    if info.is_settled:
        return settled_from_chain(contracts, info, from_block)
    tx_hash = None
    if not info.close_requested_at:
        if client.address is None or client.address.lower() != info.depositor.lower():
            raise SdkError(
                f"session {session_id} did not settle ({reason}) and only its depositor "
                f"{info.depositor} can request a close: use that key"
            )
        try:
            receipt = market.request_close(client.sender, session_id)
        except ContractRevert:
            info = market.get_session(session_id)
            if info.is_settled:  # the node settled meanwhile
                return settled_from_chain(contracts, info, from_block)
            raise
        tx_hash = receipt["transactionHash"].to_0x_hex()
        info = market.get_session(session_id)
    deadline = market.session_deadline(session_id)
    return from_state(
        info,
        status="closing",
        tx_hash=tx_hash,
        finalize_after=deadline,
        message=(
            f"{reason}; close requested on chain: the host may submit its last receipt "
            f"until {deadline} (chain time), then finalize() settles"
        ),
    )


def finalize(client: Client, session_id: int, *, from_block: int) -> Settlement:
    """Settle at the last checkpoint once the close window has passed (anyone may), so a
    host that never answers cannot hold the deposit; a settled session is reported as is."""
    contracts = client.contracts
    market = contracts.marketplace
    info = require_session(contracts, session_id)
    if info.is_settled:
        return settled_from_chain(contracts, info, from_block)
    deadline = market.session_deadline(session_id)
    now = contracts.chain.now()
    if now <= deadline:
        when = dt.datetime.fromtimestamp(deadline, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        raise SdkError(
            f"session {session_id} can be finalized after {deadline} (chain time, {when}, "
            f"{deadline - now}s from now): until then the host may submit its last receipt"
        )
    return from_event(market.finalize(client.sender, session_id))


def status(contracts: Contracts, session_id: int, from_block: int | None = None) -> SessionStatus:
    """The on-chain state of a session and what it pays (or would pay if settled now)."""
    market = contracts.marketplace
    info = require_session(contracts, session_id)
    now = contracts.chain.now()
    deadline = market.session_deadline(session_id)
    state: SessionState
    if info.is_settled:
        state = "settled"
    elif info.close_requested_at:
        state = "closing"
    elif now >= info.expires_at:
        state = "expired"
    else:
        state = "open"
    split = info.paid_split()
    tx_hash, credited = None, None
    if info.is_settled:
        start = contracts.deployment.deploy_block if from_block is None else from_block
        event = market.settlement_event(session_id, start)
        if event is not None:
            tx_hash, credited = event.tx_hash, event.refund_credited
    return SessionStatus(
        session_id=session_id,
        state=state,
        depositor=info.depositor,
        host=info.host,
        model_id=info.model_id,
        deposit=info.deposit,
        input_price_per_mtok=info.input_price_per_mtok,
        output_price_per_mtok=info.output_price_per_mtok,
        fee_bps=info.fee_bps,
        proof_interval=info.proof_interval,
        input_tokens_paid=info.input_tokens_paid,
        output_tokens_paid=info.output_tokens_paid,
        checkpoints=info.checkpoints,
        created_at=info.created_at,
        expires_at=info.expires_at,
        close_requested_at=info.close_requested_at,
        finalize_after=deadline,
        can_finalize=not info.is_settled and now > deadline,
        host_amount=split.host,
        fee=split.fee,
        refund=split.refund,
        settlement_tx=tx_hash,
        refund_credited=credited,
    )
