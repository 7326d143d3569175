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
from inferledger.node.metering import Counts
from inferledger.node.outbox import Outbox
from inferledger.node.state import HostedSession, NodeState
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


def _settled_session(state: NodeState, session_id: int, receipted: int, paid: int) -> None:
    """A session whose user signed for ``receipted`` output tokens, settled at ``paid``."""
    state.upsert_session(
        HostedSession(session_id, "0xd", "0xs", b"m" * 32, usdc("1"), 0, PRICE, 100, 10**10)
    )
    state.record_served(session_id, Counts(0, receipted), (), 0)
    state.store_receipt(session_id, Counts(0, receipted), bytes(32), b"\x01" * 65)
    outbox = Outbox(state)
    outbox.schedule_settlement(session_id, "end", 0.0)
    outbox.finish_settlement(
        session_id, "settled", input_tokens=0, tokens=paid, tx_hash="0xabc", confirmed=True
    )


def test_node_status_flags_unpaid_tokens_disagreements_and_unconfirmed_settlements(
    tmp_path: Path,
) -> None:
    path = tmp_path / "node.sqlite3"
    runner = CliRunner()
    with NodeState(path) as state:
        _settled_session(state, 1, receipted=120, paid=120)
    clean = runner.invoke(app, ["node", "status", "--state-db", str(path)])
    assert clean.exit_code == 0, clean.output
    assert "needs attention" not in clean.output

    with NodeState(path) as state:
        _settled_session(state, 2, receipted=150, paid=100)  # settled at an old checkpoint
        _settled_session(state, 3, receipted=40, paid=40)
        state.note_discrepancy(3, "settlement_lost", "the chain says open", repaired=True)
        _settled_session(state, 4, receipted=10, paid=10)
        Outbox(state).finish_settlement(4, "settled", input_tokens=0, tokens=10, block_number=9)
    flagged = runner.invoke(app, ["node", "status", "--state-db", str(path)])
    assert flagged.exit_code == 1, flagged.output
    lines = {int(line.split(":")[0].split()[1]): line for line in flagged.output.splitlines()
             if line.startswith("session ")}  # fmt: skip
    assert "UNPAID: 0 input + 50 output receipted tokens not paid" in lines[2]
    assert "DISAGREES: settlement lost: the chain says open" in lines[3]
    assert "UNCONFIRMED: settlement in block 9 awaits confirmations" in lines[4]
    assert not any(flag in lines[1] for flag in ("UNPAID", "DISAGREES", "UNCONFIRMED"))
    assert "needs attention: 1 DISAGREES, 1 UNCONFIRMED, 1 UNPAID" in flagged.output

    with NodeState(path) as state:
        state.resolve_discrepancies(3)
    resolved = runner.invoke(app, ["node", "status", "--state-db", str(path)])
    assert "DISAGREES" not in resolved.output
