"""Start a node from settings: the code behind ``inferledger node run``."""

from __future__ import annotations

import gc
import logging

import uvicorn

from inferledger.config import Settings
from inferledger.node.compose import NodeParts, build_node_parts
from inferledger.node.node import Node
from inferledger.node.preflight import PreflightFailed
from inferledger.node.server import uvicorn_config

log = logging.getLogger("inferledger.node")


def start_or_refuse(parts: NodeParts) -> Node:
    """The node to serve, or PreflightFailed when its preflight failed and the settings do
    not allow a degraded start (R2)."""
    for line in parts.preflight.lines():
        log.info("preflight: %s", line)
    if not parts.preflight.ok and not parts.settings.allow_degraded:
        parts.close()
        raise PreflightFailed(
            "preflight failed, node not started; fix these, or pass --allow-degraded (a "
            "broken prover then falls back to unproven commitment bundles; any other "
            "failure still refuses paid sessions):\n"
            + "\n".join(f"  {r.line()}" for r in parts.preflight.failures)
        )
    node = Node.from_parts(parts)
    if not node.preflight.ok:
        if node.ready:
            log.warning("starting DEGRADED: checkpoints carry unproven commitment bundles")
        else:
            log.warning("starting DEGRADED: paid sessions are refused until preflight passes")
    return node


def run_node(settings: Settings) -> None:
    """Serve until interrupted; refuse to start when preflight fails, unless allowed."""
    node = start_or_refuse(build_node_parts(settings))
    # What was loaded at start (web3, the contracts' ABIs, the model) lives as long as the
    # process: out of the collector's sight, and collections rarer, so that a busy node does
    # not rescan it many times a second.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    uvicorn.Server(
        uvicorn_config(node, settings.node_bind, settings.node_port, log_level="info")
    ).run()
