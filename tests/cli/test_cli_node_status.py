"""`inferledger node status` reads a node's SQLite state: settled, pending and failed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import node_support
from eth_utils import keccak
from node_support import NodeFactory, serve_model
from typer.testing import CliRunner

from inferledger.chain.devchain import DevWorld
from inferledger.cli.main import app
from inferledger.inference import Backend
from inferledger.sdk.wire import SessionClient
from support import open_session

start_node = node_support.start_node  # the node tests' fixtures
scripted = node_support.scripted
HELLO = [{"role": "user", "content": "hello"}]


def test_node_status_shows_each_settlement_and_fails_on_a_failed_one(
    world: DevWorld, scripted: Backend, start_node: NodeFactory, tmp_path: Path
) -> None:
    model_id = serve_model(world, scripted, keccak(text=scripted.name))
    ended, ended_signer = open_session(world, model_id=model_id)
    left, left_signer = open_session(world, model_id=model_id)
    node, server = start_node(scripted, disconnect_grace=3600)

    async def run() -> None:
        client = await SessionClient.connect(server.ws_url, ended, ended_signer.key, expect=expect(world))
        await client.chat(HELLO, max_tokens=120)
        await client.end()
        assert (await client.wait_settlement(30))["type"] == "settled"
        await client.close()
        client = await SessionClient.connect(server.ws_url, left, left_signer.key, expect=expect(world))
        await client.chat(HELLO, max_tokens=30)
        await asyncio.sleep(0.2)
        await client.close()  # no end: settled only after the grace period

    asyncio.run(run())
    for _ in range(100):
        if node.outbox.settlement(left) is not None:
            break
        time.sleep(0.05)
    runner = CliRunner()
    shown = runner.invoke(app, ["node", "status", "--state-db", str(node.state.path)])
    assert shown.exit_code == 0, shown.output
    assert f"session {ended}: settled; 120 tokens receipted of 120 sent; 2 checkpoints" in (
        shown.output
    )
    assert "settlement settled (end): host 0.216000, fee 0.024000, refund 1.760000" in (
        shown.output
    )
    assert f"session {left}: ended; 30 tokens receipted" in shown.output
    assert "settlement pending (disconnect): attempt 0" in shown.output
    assert "settlements: 1 pending, 1 settled" in shown.output

    node.outbox.finish_settlement(left, "failed", error="session 2 does not exist on chain")
    failed = runner.invoke(app, ["node", "status", "--state-db", str(node.state.path)])
    assert failed.exit_code == 1
    assert "last error: session 2 does not exist on chain" in failed.output

    missing = runner.invoke(app, ["node", "status", "--state-db", str(tmp_path / "none.db")])
    assert missing.exit_code == 1 and "no node state at" in missing.output
