"""`inferledger gateway`: the OpenAI-compatible server, run from settings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, cast

import typer

from inferledger.cli.common import (
    USER_KEY_ENV,
    DeploymentOption,
    RpcOption,
    connect_chain,
    env_key,
    err,
    one_line_errors,
    require_deployment_file,
)
from inferledger.config import load_settings

if TYPE_CHECKING:
    from inferledger.gateway.service import LocalModel


def gateway(
    port: Annotated[
        int | None,
        typer.Option("--port", help="Port to listen on. Default: gateway_port (8787)."),
    ] = None,
    bind: Annotated[
        str | None,
        typer.Option(
            "--bind",
            help="Address to listen on. Default: gateway_bind (127.0.0.1). Beyond loopback "
            "the gateway_api_key setting (INFERLEDGER_GATEWAY_API_KEY) is required.",
        ),
    ] = None,
    rpc: RpcOption = None,
    deployment: DeploymentOption = None,
) -> None:
    """Serve the OpenAI API (/v1/chat/completions, /v1/models), paying hosts per token.

    Point any OpenAI client at it (OPENAI_BASE_URL=http://127.0.0.1:8787/v1). Each request
    goes to the cheapest ready host within gateway_max_price, through a session the gateway
    opens with gateway_deposit USDC from the account of INFERLEDGER_KEY and reuses; unspent
    deposits are refunded when sessions close (when idle, on Ctrl-C or SIGTERM, or at the next
    start after a crash). Spend limits: gateway_spend_limit_day, gateway_spend_limit_total.
    With gateway_verify_share above 0 the configured backend (the model, held locally)
    re-verifies that share of the checkpoints in the background.
    Settings are INFERLEDGER_GATEWAY_* variables or inferledger.toml; see docs/gateway.md.
    """
    import logging

    import uvicorn

    from inferledger.gateway import Gateway, check_exposure, state_dir
    from inferledger.gateway.app import uvicorn_config
    from inferledger.sdk import Client

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per health check
    with one_line_errors():
        options = {
            "chain_url": rpc,
            "deployment_file": deployment,
            "gateway_port": port,
            "gateway_bind": bind,
        }
        settings = load_settings(**{k: v for k, v in options.items() if v is not None})
        check_exposure(settings)
        client = Client(
            connect_chain(settings),
            key=env_key(USER_KEY_ENV, "user"),
            deployment=require_deployment_file(settings),
            sessions_dir=state_dir(settings) / "sessions",
        )
        local_model = None
        if settings.gateway_verify_share > 0:  # re-run proofs with the user's own copy
            from inferledger.node.compose import backend_from_settings

            # cast: the gateway hands it role/content dicts, which the backend validates.
            local_model = cast("LocalModel", backend_from_settings(settings))
        service = Gateway(client, settings, local_model=local_model)
    err().print(
        f"inferledger gateway on http://{settings.gateway_bind}:{settings.gateway_port}/v1 "
        f"paying from {client.address}",
        markup=False,
    )
    uvicorn.Server(uvicorn_config(service, settings.gateway_bind, settings.gateway_port)).run()
