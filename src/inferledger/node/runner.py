"""Start a node from settings: the code behind ``inferledger node run``."""

from __future__ import annotations

import logging
from typing import Any

import uvicorn

from inferledger.chain.connect import EMBEDDED, connect
from inferledger.chain.contracts import Contracts
from inferledger.chain.deployment import Deployment
from inferledger.config import ConfigError, Settings
from inferledger.inference import Backend, load_backend
from inferledger.node.node import Node, create_node
from inferledger.node.preflight import PreflightFailed
from inferledger.node.server import uvicorn_config

log = logging.getLogger("inferledger.node")


def backend_from_settings(settings: Settings) -> Backend:
    """The configured backend, with the options each one needs."""
    options: dict[str, Any] = {}
    if settings.backend == "openai_http":
        if not settings.upstream_url:
            raise ConfigError(
                "setting upstream_url (INFERLEDGER_UPSTREAM_URL): required by the openai_http "
                "backend; set it to the OpenAI-compatible server's URL"
            )
        options = {"base_url": settings.upstream_url, "model": settings.model_name or "default"}
    elif settings.backend == "transformers":
        options = {"num_threads": 1, "progress": lambda stage: log.info("model: %s", stage)}
        if settings.weights_path is not None:
            options["gguf_path"] = settings.weights_path
    return load_backend(settings.backend, **options)


def prepare_node(settings: Settings) -> Node:
    """Connect, load the deployment and the model, and run the preflight."""
    if settings.chain_url == EMBEDDED:
        raise ConfigError(
            "setting chain_url (INFERLEDGER_CHAIN_URL): a node needs a chain other processes "
            "can reach; start one (e.g. anvil) and set its URL, or run `inferledger demo`"
        )
    if not settings.deployment_file.exists():
        raise ConfigError(
            f"setting deployment_file (INFERLEDGER_DEPLOYMENT_FILE): {settings.deployment_file} "
            "does not exist; deploy the contracts first (`inferledger deploy`)"
        )
    chain = connect(settings.chain_url, **settings.sender_options())
    contracts = Contracts.attach(chain, Deployment.load(settings.deployment_file))
    return create_node(settings, contracts=contracts, backend=backend_from_settings(settings))


def run_node(settings: Settings) -> None:
    """Serve until interrupted; refuse to start when preflight fails, unless allowed."""
    node = prepare_node(settings)
    for line in node.preflight.lines():
        log.info("preflight: %s", line)
    if not node.preflight.ok:
        failed = [f"  {r.line()}" for r in node.preflight.failures]
        if not settings.allow_degraded:
            raise PreflightFailed(
                "preflight failed, node not started; fix these, or pass --allow-degraded (a "
                "broken prover then falls back to unproven commitment bundles; any other "
                "failure still refuses paid sessions):\n" + "\n".join(failed)
            )
        if node.ready:
            log.warning("starting DEGRADED: checkpoints carry unproven commitment bundles")
        else:
            log.warning("starting DEGRADED: paid sessions are refused until preflight passes")
    uvicorn.Server(
        uvicorn_config(node, settings.node_bind, settings.node_port, log_level="info")
    ).run()
