"""`inferledger session ...`: list, inspect, close and finalize sessions."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated

import typer

from inferledger.cli.common import (
    HOST_KEY_ENV,
    USER_KEY_ENV,
    CliError,
    DeploymentOption,
    RpcOption,
    err,
    fmt_time,
    make_client,
    one_line_errors,
    out,
    prices_text,
)

if TYPE_CHECKING:
    from rich.console import Console

    from inferledger.sdk import Client, SessionRecord, Settlement

session_app = typer.Typer(
    help="List, inspect, close and finalize sessions.", add_completion=False, no_args_is_help=True
)
NO_RECORD = "no local record of this session, so the node was not asked to settle"
SessionId = Annotated[int, typer.Argument(help="The session id (as `chat` printed it).", min=1)]


@session_app.command("list")
def list_sessions(rpc: RpcOption = None, deployment: DeploymentOption = None) -> None:
    """List the sessions recorded on this machine for this deployment, newest first.

    Records live in $INFERLEDGER_HOME/sessions; the state column is read from the chain,
    and a record the chain shows settled since (a node that settled after `close` stopped
    waiting) is updated with its settlement.
    """
    from rich.table import Table

    from inferledger.chain.units import format_usdc

    with one_line_errors():
        client = make_client(rpc, deployment)
        records = client.sessions.records()
        if not records:
            err().print(
                f"no session records in {client.sessions.store.directory} for marketplace "
                f"{client.contracts.marketplace.address}; open one with `inferledger chat`"
            )
            return
        table = Table("id", "state")
        # Input/output tokens: accepted by this client (billed or not yet), paid on chain.
        table.add_column("tokens in/out", no_wrap=True)
        table.add_column("paid in/out", no_wrap=True)
        for column in ("deposit", "host", "opened (UTC)"):
            table.add_column(column)
        for record in records:
            state: str
            try:
                client.sessions.refresh(record.session_id)
                status = client.sessions.status(record.session_id)
                paid = f"{status.input_tokens_paid}/{status.output_tokens_paid}"
                state = status.state
            except Exception:
                state, paid = "unknown", "?"
            table.add_row(
                str(record.session_id),
                state,
                f"{record.input_tokens}/{record.tokens}",
                paid,
                format_usdc(record.deposit),
                f"{record.host[:6]}...{record.host[-4:]}",
                _local_time(record.created_at),
            )
        out().print(table)


@session_app.command("show")
def show(session_id: SessionId, rpc: RpcOption = None, deployment: DeploymentOption = None) -> None:
    """Print a session's on-chain state and money, and its local record if there is one
    (updated first if the chain shows the session settled since)."""
    with one_line_errors():
        client = make_client(rpc, deployment)
        print_status(out(), client, session_id)
        if _local_record(client, session_id) is not None:
            print_record(out(), client, client.sessions.refresh(session_id))


@session_app.command("close")
def close(
    session_id: SessionId, rpc: RpcOption = None, deployment: DeploymentOption = None
) -> None:
    """End a session you deposited for (INFERLEDGER_KEY) and print how it settled.

    Asks the host's node to settle and waits for it (through any settlement_pending, up
    to two minutes); if it does not settle, requests the close on chain, after which the
    host has the close window to submit its last receipt and anyone can
    `inferledger session finalize`. `session show` learns a settlement that lands later.
    """
    with one_line_errors():
        client = make_client(rpc, deployment, key=_key(USER_KEY_ENV))
        if _local_record(client, session_id) is None:
            settlement = client.sessions.request_close(session_id, reason=NO_RECORD)
        else:
            session = client.sessions.resume(session_id, auto_close=False)
            spinner = err().status(f"closing session {session_id}: asking the node to settle...")
            with spinner:
                settlement = session.close(
                    on_pending=lambda frame: spinner.update(
                        f"closing session {session_id}: the node's settlement is pending "
                        f"({frame.reason}); waiting for it..."
                    )
                )
        print_settlement(out(), settlement)


@session_app.command("finalize")
def finalize(
    session_id: SessionId, rpc: RpcOption = None, deployment: DeploymentOption = None
) -> None:
    """Settle a session whose close window has passed, at its last checkpoint (anyone may).

    Signs with INFERLEDGER_KEY, else INFERLEDGER_HOST_KEY.
    """
    with one_line_errors():
        key = os.environ.get(USER_KEY_ENV) or os.environ.get(HOST_KEY_ENV)
        if not key:
            raise CliError(
                f"finalizing sends a transaction: set {USER_KEY_ENV} (or {HOST_KEY_ENV}) to a "
                "key with gas"
            )
        client = make_client(rpc, deployment, key=key.strip())
        if _local_record(client, session_id) is None:
            settlement = client.sessions.finalize(session_id)
        else:
            settlement = client.sessions.resume(session_id, auto_close=False).finalize()
        print_settlement(out(), settlement)


def print_status(console: Console, client: Client, session_id: int) -> None:
    from inferledger.chain.units import format_usdc

    status = client.sessions.status(session_id)
    settled = status.state == "settled"
    lines = [
        f"session {session_id}: {status.state}",
        f"  depositor   {status.depositor}",
        f"  host        {status.host}",
        f"  model       0x{status.model_id.hex()}",
        f"  price       "
        f"{prices_text(status.input_price_per_mtok, status.output_price_per_mtok)} USDC/token",
        f"  deposit     {format_usdc(status.deposit)} USDC",
        f"  tokens paid input {status.input_tokens_paid}, output {status.output_tokens_paid} "
        f"(checkpoints on chain: {status.checkpoints})",
        f"  opened      {fmt_time(status.created_at)}, expires {fmt_time(status.expires_at)}",
    ]
    if status.close_requested_at:
        lines.append(f"  close requested {fmt_time(status.close_requested_at)}")
    if not settled and (status.close_requested_at or status.state == "expired"):
        when = "now" if status.can_finalize else f"after {fmt_time(status.finalize_after)}"
        lines.append(f"  finalize    {when} (`inferledger session finalize {session_id}`)")
    label = "settled" if settled else "if settled now"
    lines.append(
        f"  {label}: host {format_usdc(status.host_amount)}, fee {format_usdc(status.fee)}, "
        f"refund {format_usdc(status.refund)} USDC"
    )
    if status.settlement_tx:
        credited = " (refund credited: withdraw it)" if status.refund_credited else ""
        lines.append(f"  settlement tx {status.settlement_tx}{credited}")
    console.print("\n".join(lines), markup=False)


def print_record(console: Console, client: Client, record: SessionRecord) -> None:
    from inferledger.chain.units import format_usdc

    signed = record.signed_counts()
    path = client.sessions.store.path_of(record)
    lines = [
        f"local record {path}",
        f"  node        {record.node_url}",
        f"  replies     {len(record.replies)}: {record.input_tokens} input tokens billed, "
        f"{record.tokens} output tokens received",
        f"  cost        {format_usdc(_record_cost(record))} USDC at the session's prices",
        f"  receipts    {len(record.receipts)} signed, the last for {signed[0]} input + "
        f"{signed[1]} output tokens",
    ]
    if record.settlement:
        closed = record.settlement
        lines.append(
            f"  closed      {closed['status']} (reported by the {closed['reported_by']}): "
            f"{closed['input_tokens']} input + {closed['output_tokens']} output tokens paid"
            + (" if finalized now" if closed["status"] == "closing" else "")
        )
    console.print("\n".join(lines), markup=False)


def print_settlement(console: Console, settlement: Settlement) -> None:
    from inferledger.chain.units import format_usdc

    amounts = (
        f"{settlement.input_tokens} input + {settlement.output_tokens} output tokens; host "
        f"{format_usdc(settlement.host_amount)}, fee "
        f"{format_usdc(settlement.fee)}, refund {format_usdc(settlement.refund)} USDC"
    )
    if settlement.settled:
        credited = " (refund credited: withdraw it)" if settlement.refund_credited else ""
        console.print(
            f"session {settlement.session_id} settled: {amounts}{credited}\n"
            f"  tx {settlement.tx_hash or '(not found)'}",
            markup=False,
        )
        return
    after = fmt_time(settlement.finalize_after or 0)
    console.print(
        f"session {settlement.session_id} closing: {amounts} if finalized now\n"
        f"  {settlement.message}\n"
        f"  after {after}: `inferledger session finalize {settlement.session_id}`"
        + (f"\n  tx {settlement.tx_hash}" if settlement.tx_hash else ""),
        markup=False,
    )


def _record_cost(record: SessionRecord) -> int:
    from inferledger.chain.units import cost

    return cost(
        record.input_tokens,
        record.tokens,
        record.input_price_per_mtok,
        record.output_price_per_mtok,
    )


def _local_record(client: Client, session_id: int) -> SessionRecord | None:
    c = client.contracts
    path = client.sessions.store.path(c.chain.chain_id, c.marketplace.address, session_id)
    if not path.is_file():
        return None
    return client.sessions.store.load(c.chain.chain_id, c.marketplace.address, session_id)


def _key(env: str) -> str:
    from inferledger.cli.common import env_key

    return env_key(env, "depositor" if env == USER_KEY_ENV else "host")


def _local_time(timestamp: float) -> str:
    return fmt_time(int(timestamp)).removesuffix(" UTC")
