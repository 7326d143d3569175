"""The ``inferledger`` command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from inferledger.cli.common import DeploymentOption, RpcOption, one_line_errors, settings_for
from inferledger.cli.demo import MAX_TOKENS, QUESTION
from inferledger.config import ConfigError, env_name, load_settings, setting_ref

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
    question: str = typer.Option(
        QUESTION, "--question", help="What to ask SmolLM2 (answered greedily)."
    ),
    max_tokens: int = typer.Option(
        MAX_TOKENS,
        "--max-tokens",
        min=1,
        help="Longest answer, in tokens; 200 reproduces the seed's $0.36 / $0.04 / $1.60.",
    ),
) -> None:
    """Run the whole marketplace once, for real, and print the seed's verification table.

    In one process: deploys the contracts, registers a host serving SmolLM2 at
    $0.002/token, starts its node on 127.0.0.1, opens a 2 USDC session through the SDK,
    streams a real answer with a signed receipt and a proof every 100 tokens, ends the
    session (the node settles on chain), re-verifies every proof by prefill and prints
    the host, treasury and refund amounts read back through the SDK. The first run also
    converts the model (about 30 s).
    """
    from inferledger.cli.demo import run_demo

    with one_line_errors():
        run_demo(
            load_settings(**({"chain_url": rpc} if rpc else {})),
            question=question,
            max_tokens=max_tokens,
        )


@app.command()
def doctor(
    rpc: RpcOption = None,
    deployment: DeploymentOption = None,
    model_name: Annotated[
        str | None,
        typer.Option(
            "--model-name",
            help="Check as if the model_name setting were this (the name the backend reports "
            "and ModelRegistry approves). Default: the model_name setting.",
        ),
    ] = None,
    weights: Annotated[
        Path | None,
        typer.Option(
            "--weights",
            help="Check as if the weights_path setting were this (transformers backend). "
            "Default: the weights_path setting, else the packaged SmolLM2 GGUF.",
        ),
    ] = None,
) -> None:
    """Check everything a paid session needs: one line per check, exit 1 if any fails.

    Builds the node's parts exactly as `inferledger node run` does (it loads the model and
    opens the node's state) and stops after the preflight: it fails exactly when `node run`
    without --allow-degraded refuses to start. Each failing line names the broken part, the
    setting that controls it and the fix.
    """
    from rich.console import Console

    from inferledger.node.compose import build_node_parts

    overrides = {"model_name": model_name, "weights_path": weights}
    with one_line_errors():
        settings = settings_for(rpc, deployment, **overrides)
        parts = build_node_parts(settings)
    parts.close()
    console = Console(highlight=False, soft_wrap=True)
    colours = {"ok": "green", "failed": "red", "skipped": "yellow"}
    for result in parts.preflight.results:
        console.print(result.line(), style=colours[result.status], markup=False)
    if not parts.preflight.ok:
        raise typer.Exit(1)


@app.command()
def version() -> None:
    """Print the inferledger version."""
    from importlib.metadata import version as package_version

    typer.echo(package_version("inferledger"))


node_app = typer.Typer(help="Run a host node.", no_args_is_help=True)
app.add_typer(node_app, name="node")


@node_app.command("run")
def node_run(
    allow_degraded: Annotated[
        bool,
        typer.Option(
            "--allow-degraded",
            help="Start even if preflight fails: /health says degraded. A broken prover "
            "falls back to unproven commitment bundles (receipts still pay); any other "
            "failure refuses paid sessions with NODE_NOT_READY.",
        ),
    ] = False,
    port: Annotated[
        int | None, typer.Option("--port", help="Port to listen on. Default: node_port.")
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option("--backend", help="transformers, scripted or openai_http. Default: backend."),
    ] = None,
    prover: Annotated[
        str | None,
        typer.Option(
            "--prover",
            help=f"auto, activation, commitment, external (set {env_name('external_prover')}) "
            "or mock (dev chains only). Default: prover setting (auto).",
        ),
    ] = None,
) -> None:
    """Serve the configured model to paid sessions (WebSocket /v1/ws, /health, /metrics).

    Runs the preflight first and refuses to start when it fails, printing one line
    per broken part. Every checkpoint is proved, stored and served at /v1/proofs; the
    settlement worker pays each session out on end, after a disconnect, before expiry
    or on a close request, and resumes after a restart from the node's SQLite state.
    Settings come from INFERLEDGER_* variables and inferledger.toml.
    """
    import logging

    from inferledger.node.runner import run_node

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    overrides: dict[str, object] = {}
    if allow_degraded:
        overrides["allow_degraded"] = True
    if port is not None:
        overrides["node_port"] = port
    if backend is not None:
        overrides["backend"] = backend
    if prover is not None:
        overrides["prover"] = prover
    with one_line_errors():
        run_node(load_settings(**overrides))


@app.command()
def deploy(
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Where to write the deployment record (deployment_file)."),
    ] = None,
    rpc: Annotated[
        str | None, typer.Option("--rpc", help="JSON-RPC URL of the chain. Default: chain_url.")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token", help="Payment token (USDC) address. Default: deploy TestUSDC (dev chains)."
        ),
    ] = None,
) -> None:
    """Deploy the contracts and write the deployment record (addresses, chain id, block).

    On a dev chain (anvil) without a deployer_key, a public dev key is funded and used,
    and a TestUSDC is deployed as the payment token.
    """
    from inferledger.chain.connect import EMBEDDED, connect
    from inferledger.chain.deploy import deploy as deploy_contracts
    from inferledger.chain.deployment import DeployParams
    from inferledger.chain.devchain import GAS_MONEY, dev_account

    with one_line_errors():
        overrides: dict[str, object] = {"chain_url": rpc} if rpc else {}
        settings = load_settings(**overrides)
        if settings.chain_url == EMBEDDED:
            raise ConfigError(
                f"{setting_ref('chain_url')}: deploying to the embedded chain keeps nothing "
                "after this process; pass --rpc with a chain URL"
            )
        chain = connect(settings.chain_url, gas_cap=settings.gas_cap)
        if settings.deployer_key is not None:
            sender = chain.sender(settings.deployer_key.get_secret_value())
        elif chain.is_dev:
            sender = chain.sender(dev_account("owner"))
            chain.fund(sender.address, GAS_MONEY)
        else:
            raise ConfigError(f"{setting_ref('deployer_key')}: required on a non-dev chain")
        contracts = deploy_contracts(chain, sender, DeployParams(token=token))
        path = out or settings.deployment_file
        contracts.deployment.save(path)
    typer.echo(f"deployed to chain {chain.chain_id}; record written to {path}")
    for name, address in contracts.deployment.addresses:
        typer.echo(f"  {name:<15} {address}")


def _add_commands() -> None:
    """The chain, model, host, session, chat, verify, gateway and node status commands."""
    from inferledger.cli.chain_cmd import chain_app
    from inferledger.cli.chat_cmd import chat
    from inferledger.cli.dispute_cmd import dispute_app
    from inferledger.cli.gateway_cmd import gateway
    from inferledger.cli.host_cmd import host_app
    from inferledger.cli.model_cmd import model_app
    from inferledger.cli.node_cmd import status
    from inferledger.cli.session_cmd import session_app
    from inferledger.cli.verifier_cmd import verifier_app
    from inferledger.cli.verify_cmd import verify

    node_app.command("status")(status)
    app.add_typer(chain_app, name="chain")
    app.add_typer(model_app, name="model")
    app.add_typer(host_app, name="host")
    app.add_typer(session_app, name="session")
    app.add_typer(dispute_app, name="dispute")
    app.add_typer(verifier_app, name="verifier")
    app.command("chat")(chat)
    app.command("verify")(verify)
    app.command("gateway")(gateway)


_add_commands()


if __name__ == "__main__":
    app()
