"""`inferledger verifier ...`: a staked juror of disputes (INFERLEDGER_VERIFIER_KEY)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from inferledger.chain.units import format_usdc
from inferledger.cli.common import (
    CliError,
    DeploymentOption,
    RpcOption,
    err,
    make_client,
    one_line_errors,
    out,
    parse_usdc,
    setting_key,
    settings_for,
)
from inferledger.cli.verify_cmd import VerifierBackend, load_verifier_backend
from inferledger.config import env_name

if TYPE_CHECKING:
    from inferledger.config import Settings
    from inferledger.sdk import Client

VERIFIER_KEY_ENV = env_name("verifier_key")

verifier_app = typer.Typer(
    help="Register as a staked verifier and judge the disputes you are drawn for. "
    f"Transactions and verdicts are signed with {VERIFIER_KEY_ENV}.",
    add_completion=False,
    no_args_is_help=True,
)


def _key(settings: Settings) -> str:
    return setting_key(settings, "verifier_key", "verifier")


def _client(rpc: str | None, deployment: Path | None) -> Client:
    return make_client(rpc, deployment, key=_key(settings_for(rpc, deployment)))


@verifier_app.command("register")
def register(
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            help="Where challengers deliver evidence: this verifier's http(s) base URL. "
            "Default: http://<verifier_bind>:<verifier_port>.",
        ),
    ] = None,
    stake: Annotated[
        str | None,
        typer.Option("--stake", help="USDC to stake. Default: the registry's minimum."),
    ] = None,
    rpc: RpcOption = None,
    deployment: DeploymentOption = None,
) -> None:
    """Stake and join the verifiers disputes draw their juries from."""
    with one_line_errors():
        settings = settings_for(rpc, deployment)
        client = _client(rpc, deployment)
        registry = client.contracts.verifiers
        amount = parse_usdc(stake, "--stake") if stake else registry.min_stake()
        url = url or f"http://{settings.verifier_bind}:{settings.verifier_port}"
        token = client.contracts.token
        if token.allowance(client.sender.address, registry.address) < amount:
            token.approve(client.sender, registry.address, amount)
        registry.register(client.sender, url, amount)
        out().print(
            f"verifier {client.sender.address} registered at {url}, "
            f"staked {format_usdc(amount)} USDC"
        )


@verifier_app.command("status")
def status(
    address: Annotated[str | None, typer.Argument(help="Default: this verifier.")] = None,
    rpc: RpcOption = None,
    deployment: DeploymentOption = None,
) -> None:
    """A verifier's URL, stake, state and open jury seats."""
    with one_line_errors():
        client = _client(rpc, deployment) if address is None else make_client(rpc, deployment)
        who = address or client.sender.address
        info = client.contracts.verifiers.get_verifier(who)
        if not info.registered:
            raise CliError(f"{who} is not a registered verifier: `inferledger verifier register`")
        state = "active" if info.active else "inactive (unbonding or below the minimum stake)"
        out().print(
            f"verifier {who}: {state}, stake {format_usdc(info.stake)} USDC, "
            f"{info.assignments} open jury seats, url {info.url}"
        )


@verifier_app.command("run")
def run(
    backend: Annotated[
        VerifierBackend,
        typer.Option("--backend", help="Model to re-run disputed checkpoints with."),
    ] = VerifierBackend.transformers,
    port: Annotated[
        int | None, typer.Option("--port", help="Port to listen on. Default: verifier_port.")
    ] = None,
    rpc: RpcOption = None,
    deployment: DeploymentOption = None,
) -> None:
    """Judge the disputes this verifier is drawn for, until interrupted.

    Listens for evidence at POST /v1/disputes/{id}/evidence (and /health, /metrics),
    watches the chain, draws juries and replaces silent jurors for anyone, re-runs each
    disputed checkpoint with the model and relays its signed verdict.
    """
    import logging

    import uvicorn
    from eth_account import Account

    from inferledger.verifier.service import VerifierService, create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with one_line_errors():
        settings = settings_for(rpc, deployment)
        client = _client(rpc, deployment)
        me = client.contracts.verifiers.get_verifier(client.sender.address)
        if not me.registered:
            raise CliError(
                f"{client.sender.address} is not a registered verifier: run "
                "`inferledger verifier register` first"
            )
        model = load_verifier_backend(backend.value, err())
        service = VerifierService(
            client.contracts,
            client.sender,
            model,
            private_key=bytes(Account.from_key(_key(settings)).key),
            poll_interval=settings.verifier_poll_interval,
        )
        err().print(f"verifier {client.sender.address} judging with {backend.value}")
        uvicorn.run(
            create_app(service),
            host=settings.verifier_bind,
            port=settings.verifier_port if port is None else port,
            log_level="warning",
        )
