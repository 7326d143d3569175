"""`inferledger node status` reads a node's SQLite state: settled, pending and failed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import node_support
from eth_utils import keccak
from node_support import NodeFactory, expect, serve_model
from typer.testing import CliRunner

from inferledger.chain.devchain import INPUT_PRICE, PRICE, DevWorld
from inferledger.chain.units import format_usdc, settlement_split, usdc
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

    async def run() -> tuple[int, int]:
        client = await SessionClient.connect(
            server.ws_url, ended, ended_signer.key, expect=expect(world)
        )
        await client.chat(HELLO, max_tokens=120)
        await client.end()
        settled = await client.wait_settlement(30)
        assert settled is not None and settled.type == "settled"
        await client.close()
        ended_input = client.input_tokens
        client = await SessionClient.connect(
            server.ws_url, left, left_signer.key, expect=expect(world)
        )
        await client.chat(HELLO, max_tokens=30)
        await asyncio.sleep(0.2)
        await client.close()  # no end: settled only after the grace period
        return ended_input, client.input_tokens

    ended_input, left_input = asyncio.run(run())
    assert ended_input > 0 and left_input > 0  # the prompts are billed too
    split = settlement_split(usdc("2"), ended_input, 120, INPUT_PRICE, PRICE, 1000)
    for _ in range(100):
        if node.outbox.settlement(left) is not None:
            break
        time.sleep(0.05)
    runner = CliRunner()
    shown = runner.invoke(app, ["node", "status", "--state-db", str(node.state.path)])
    assert shown.exit_code == 0, shown.output
    counts = f"{ended_input} input + 120 output tokens"
    assert f"session {ended}: settled; {counts} receipted of {ended_input} + 120 served; " in (
        shown.output
    )
    assert f"; 2 checkpoints; settlement settled (end): {counts} paid, " in shown.output
    assert (
        f"host {format_usdc(split.host)}, fee {format_usdc(split.fee)}, "
        f"refund {format_usdc(split.refund)} USDC" in shown.output
    )
    assert split.host > 216_000  # 90% of 120 x $0.002, and of the prompt at $0.0005
    assert f"session {left}: ended; {left_input} input + 30 output tokens receipted" in (
        shown.output
    )
    assert "settlement pending (disconnect): attempt 0" in shown.output
    assert "settlements: 1 pending, 1 settled" in shown.output

    node.outbox.finish_settlement(left, "failed", error="session 2 does not exist on chain")
    failed = runner.invoke(app, ["node", "status", "--state-db", str(node.state.path)])
    assert failed.exit_code == 1
    assert "last error: session 2 does not exist on chain" in failed.output

    missing = runner.invoke(app, ["node", "status", "--state-db", str(tmp_path / "none.db")])
    assert missing.exit_code == 1 and "no node state at" in missing.output
