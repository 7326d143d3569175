"""`inferledger dispute ...`: challenge a checkpoint a host signed (INFERLEDGER_KEY)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from inferledger.chain.units import format_usdc
from inferledger.cli.common import (
    USER_KEY_ENV,
    CliError,
    DeploymentOption,
    RpcOption,
    env_key,
    err,
    make_client,
    one_line_errors,
    out,
)

if TYPE_CHECKING:
    from inferledger.chain.contracts import DisputeInfo
    from inferledger.sdk import Client, SessionRecord

dispute_app = typer.Typer(
    help="Open a dispute on a checkpoint whose proof failed, follow it, collect what it "
    f"pays. Transactions are signed with {USER_KEY_ENV}.",
    add_completion=False,
    no_args_is_help=True,
)

STATUS = {1: "open", 2: "resolved", 3: "cancelled"}


def _client(rpc: str | None, deployment: Path | None) -> Client:
    return make_client(rpc, deployment, key=env_key(USER_KEY_ENV, "challenger"))


def _record(client: Client, session_id: int, path: Path | None) -> SessionRecord:
    from inferledger.sdk import SessionRecord

    if path is not None:
        try:
            return SessionRecord.model_validate_json(path.read_text())
        except (OSError, ValueError) as exc:
            raise CliError(f"--record {path}: not a session record ({exc})") from None
    try:
        return client.sessions.refresh(session_id)
    except Exception as exc:
        raise CliError(
            f"no local record of session {session_id} ({exc}): pass --record FILE, the "
            "session's record (the transcript only its holder has)"
        ) from None


@dispute_app.command("open")
def open_dispute(
    session_id: Annotated[int, typer.Argument(help="The settled session to dispute.", min=1)],
    checkpoint: Annotated[
        int, typer.Option("--checkpoint", min=1, help="The checkpoint (bundle index) to dispute.")
    ],
    record_file: Annotated[
        Path | None,
        typer.Option("--record", metavar="FILE", help="The session's record. Default: local."),
    ] = None,
    wait: Annotated[
        float,
        typer.Option("--wait", help="Seconds to follow the dispute to its verdict; 0: do not."),
    ] = 600.0,
    rpc: RpcOption = None,
    deployment: DeploymentOption = None,
) -> None:
    """Bond, open, draw the jury, deliver the evidence to each juror, follow the verdict."""
    with one_line_errors():
        client = _client(rpc, deployment)
        record = _record(client, session_id, record_file)
        disputes = client.disputes
        bond = client.contracts.disputes.bond()
        dispute_id = disputes.open(record, checkpoint)
        err().print(f"dispute {dispute_id} opened, bond {format_usdc(bond)} USDC")
        jurors = disputes.draw(dispute_id)
        err().print(f"jury: {', '.join(jurors)}")
        for delivery in disputes.deliver(dispute_id, record):
            if delivery.late:
                state = "was not needed: the others' verdicts decided the dispute"
            elif delivery.ok:
                state = "took the evidence"
            else:
                state = f"refused it: {delivery.message}"
            err().print(f"  {delivery.juror} {state}")
        if wait > 0:
            _print(dispute_id, disputes.wait(dispute_id, timeout=wait))
        else:
            out().print(f"dispute {dispute_id} open: `inferledger dispute show {dispute_id}`")


@dispute_app.command("show")
def show(
    dispute_id: Annotated[int, typer.Argument(help="The dispute.", min=1)],
    rpc: RpcOption = None,
    deployment: DeploymentOption = None,
) -> None:
    """A dispute's state, jury and votes."""
    with one_line_errors():
        client = make_client(rpc, deployment)
        info = client.disputes.show(dispute_id)
        if info.session_id == 0:
            raise CliError(f"no dispute {dispute_id} on this deployment")
        _print(dispute_id, info)


@dispute_app.command("withdraw")
def withdraw(rpc: RpcOption = None, deployment: DeploymentOption = None) -> None:
    """Withdraw what resolved disputes credited this account."""
    with one_line_errors():
        amount = _client(rpc, deployment).disputes.withdraw()
        out().print(f"withdrew {format_usdc(amount)} USDC")


def _print(dispute_id: int, info: DisputeInfo) -> None:
    state = STATUS.get(info.status, str(info.status))
    if info.status == 2:
        state += ": FRAUD, the host was slashed" if info.fraud else ": no fraud"
    out().print(
        f"dispute {dispute_id} on session {info.session_id} checkpoint {info.checkpoint_index}: "
        f"{state} ({info.votes_fraud} fraud / {info.votes_honest} honest votes; jury "
        f"{', '.join(info.jurors) or 'not drawn'})"
    )
