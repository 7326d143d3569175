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
from inferledger.config import env_name
from inferledger.node.compose import state_path
from inferledger.node.outbox import Outbox, SettlementRecord
from inferledger.node.state import Discrepancy, HostedSession, NodeState


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

    Flags what needs an operator: a settlement that failed for good (FAILED), receipted
    tokens the settlement did not pay (UNPAID), books that disagree with the chain
    (DISAGREES), a settlement not yet under the node's confirmations (UNCONFIRMED). Exits 1
    when any flag is raised, so it can run in a health check.
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
                f"--state-db or set {env_name('state_db')} to the node's state file"
            )
        with NodeState(path) as state:
            flagged = _print_sessions(state)
    if flagged:
        raise typer.Exit(1)


def _print_sessions(state: NodeState) -> int:
    """One line per session (easy to read and to grep); returns how many flags were raised."""
    outbox = Outbox(state)
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"node state {state.path}")
    counts: dict[str, int] = {}
    flags: dict[str, int] = {}
    disagreements: dict[int, list[Discrepancy]] = {}
    for found in state.open_discrepancies():
        disagreements.setdefault(found.session_id, []).append(found)
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
        if settlement is not None:
            line += _settlement_part(settlement)
        raised = _flags(record, settlement, disagreements.get(record.session_id, []))
        for flag, _ in raised:
            flags[flag] = flags.get(flag, 0) + 1
        line += "".join(f"; {flag}: {why}" for flag, why in raised)
        status = settlement.status if settlement else None
        style = "red" if raised else {"settled": "green", None: ""}.get(status, "yellow")
        console.print(line, style=style or None, markup=False)
    summary = ", ".join(f"{n} {name}" for name, n in sorted(counts.items())) or "no sessions"
    console.print(f"settlements: {summary}")
    if flags:
        console.print(
            "needs attention: " + ", ".join(f"{n} {flag}" for flag, n in sorted(flags.items())),
            style="red",
        )
    return sum(flags.values())


def _settlement_part(settlement: SettlementRecord) -> str:
    part = f"; settlement {settlement.status} ({settlement.reason})"
    if settlement.status == "settled":
        part += (
            f": {settlement.input_tokens or 0} input + {settlement.tokens or 0} output "
            f"tokens paid, host {format_usdc(settlement.host_amount or 0)}, "
            f"fee {format_usdc(settlement.fee or 0)}, "
            f"refund {format_usdc(settlement.refund or 0)} USDC; tx {settlement.tx_hash or '-'}"
        )
    else:
        due = datetime.fromtimestamp(settlement.due_at, UTC).strftime("%H:%M:%S UTC")
        part += f": attempt {settlement.attempts}, next at {due}"
    if settlement.last_error and settlement.status != "settled":
        part += f"; last error: {settlement.last_error}"
    return part


def _flags(
    record: HostedSession, settlement: SettlementRecord | None, disagreements: list[Discrepancy]
) -> list[tuple[str, str]]:
    """(FLAG, why) for each thing about this session an operator must look at."""
    raised = [
        (
            "DISAGREES",
            f"{d.kind.replace('_', ' ')}: {d.detail}"
            + ("" if d.repaired else " (cannot be repaired by the node)"),
        )
        for d in disagreements
    ]
    if settlement is None:
        return raised
    if settlement.status == "failed":
        raised.insert(0, ("FAILED", "settlement failed for good; see the last error"))
    if settlement.status == "settled":
        unpaid_in = record.input_receipted - (settlement.input_tokens or 0)
        unpaid_out = record.tokens_receipted - (settlement.tokens or 0)
        if unpaid_in > 0 or unpaid_out > 0:
            raised.append(
                ("UNPAID", f"{unpaid_in} input + {unpaid_out} output receipted tokens not paid")
            )
        if not settlement.confirmed:
            where = f"block {settlement.block_number}" if settlement.block_number else "its block"
            raised.append(("UNCONFIRMED", f"settlement in {where} awaits confirmations"))
    return raised
