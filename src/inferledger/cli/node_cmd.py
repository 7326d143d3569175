"""`inferledger node status`: what the node owes and what went wrong, from its own state.

It reads the node's SQLite state directly, so it works while the node is down, which is
exactly when an operator needs it (the seed incident: nothing settled, nobody saw why).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from inferledger.chain.deployment import Deployment
from inferledger.chain.units import format_usdc
from inferledger.cli.common import (
    CliError,
    DeploymentOption,
    one_line_errors,
    require_deployment_file,
    settings_for,
)
from inferledger.node.node import state_path
from inferledger.node.outbox import Outbox
from inferledger.node.state import NodeState


def status(
    deployment: DeploymentOption = None,
    state_db: Annotated[
        Path | None,
        typer.Option(
            "--state-db",
            metavar="FILE",
            help="The node's SQLite state. Default: the state_db setting, else the file "
            "the node uses for this deployment.",
        ),
    ] = None,
) -> None:
    """Show every session the node holds: tokens, checkpoints, settlement and its last error.

    Exits 1 when a settlement failed for good, so it can run in a health check.
    """
    with one_line_errors():
        settings = settings_for(None, deployment)
        path = state_db or settings.state_db
        if path is None:
            record = Deployment.load(require_deployment_file(settings))
            path = state_path(settings, record.chain_id, record.addresses.marketplace)
        if not path.is_file():
            raise CliError(
                f"no node state at {path}: the node has not run for this deployment; pass "
                "--state-db or set INFERLEDGER_STATE_DB to the node's state file"
            )
        with NodeState(path) as state:
            failed = _print_sessions(state)
    if failed:
        raise typer.Exit(1)


def _print_sessions(state: NodeState) -> int:
    """One line per session (easy to read and to grep); returns how many failed."""
    outbox = Outbox(state)
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"node state {state.path}")
    counts: dict[str, int] = {}
    for record in state.list_sessions():
        checkpoints = outbox.checkpoints(record.session_id)
        unproven = sum(c.unproven for c in checkpoints)
        settlement = outbox.settlement(record.session_id)
        name = settlement.status if settlement else "no settlement yet"
        counts[name] = counts.get(name, 0) + 1
        line = (
            f"session {record.session_id}: {record.status}; {record.input_receipted} input + "
            f"{record.tokens_receipted} output tokens receipted of {record.input_served} + "
            f"{record.tokens_generated} served; {len(checkpoints)} checkpoints"
            + (f" ({unproven} unproven)" if unproven else "")
        )
        if settlement is None:
            console.print(line)
            continue
        line += f"; settlement {settlement.status} ({settlement.reason})"
        if settlement.status == "settled":
            line += (
                f": {settlement.input_tokens or 0} input + {settlement.tokens or 0} output "
                f"tokens paid, host {format_usdc(settlement.host_amount or 0)}, "
                f"fee {format_usdc(settlement.fee or 0)}, "
                f"refund {format_usdc(settlement.refund or 0)} USDC; tx {settlement.tx_hash or '-'}"
            )
        else:
            due = datetime.fromtimestamp(settlement.due_at, UTC).strftime("%H:%M:%S UTC")
            line += f": attempt {settlement.attempts}, next at {due}"
        if settlement.last_error and settlement.status != "settled":
            line += f"; last error: {settlement.last_error}"
        style = {"settled": "green", "failed": "red"}.get(settlement.status, "yellow")
        console.print(line, style=style, markup=False)
    summary = ", ".join(f"{n} {name}" for name, n in sorted(counts.items())) or "no sessions"
    console.print(f"settlements: {summary}")
    return counts.get("failed", 0)
