"""The ``inferledger`` command."""

from __future__ import annotations

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
def version() -> None:
    """Print the inferledger version."""
    from importlib.metadata import version as package_version

    typer.echo(package_version("inferledger"))
