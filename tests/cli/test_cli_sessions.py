"""`chat` (interactive, piped, kept open and resumed), `session list|show|close|finalize` and
`host update|show`, in process against anvil and a scripted node on loopback."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from eth_utils import keccak
from node_support import wait_until
from test_faults import TcpProxy
from typer.testing import CliRunner, Result

from inferledger.chain.anvil import start_anvil
from inferledger.chain.connect import Chain, connect
from inferledger.chain.devchain import DevWorld, build_dev_world, dev_account
from inferledger.chain.units import usdc
from inferledger.cli import chat_cmd
from inferledger.cli.main import app
from inferledger.config import load_settings
from inferledger.inference import load_backend
from inferledger.node.node import create_node
from inferledger.node.server import BackgroundServer
from inferledger.node.state import NodeState
from inferledger.sdk import Client, SessionRecord, lifecycle

MODEL = "scripted/words"


@dataclass
class Market:
    chain: Chain
    world: DevWorld
    deployment: Path
    home: Path
    model_id: bytes


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Market]:
    tmp = tmp_path_factory.mktemp("sessions")
    with start_anvil() as anvil:
        chain = connect(anvil.url)
        world = build_dev_world(chain)
        backend = load_backend("scripted", tokens_per_second=0)
        c = world.contracts
        model_id = c.models.approve_model(world.owner, MODEL, keccak(text="scripted"))
        c.nodes.set_models(world.host, {model_id: (0, 2_000_000_000)})
        settings = load_settings(
            host_key="0x" + dev_account("host").key.hex(),
            chain_url=anvil.url,
            state_db=tmp / "node.sqlite3",
            proof_store=tmp / "proofs",
        )
        state = NodeState(tmp / "node.sqlite3")
        node = create_node(settings, contracts=c, backend=backend, state=state)
        server = BackgroundServer(node).start()
        try:
            c.nodes.update_url(world.host, server.url)
            deployment = tmp / "deployment.json"
            c.deployment.save(deployment)
            yield Market(chain, world, deployment, tmp / "home", model_id)
        finally:
            for session in lifecycle.open_sessions():
                lifecycle.unregister(session)
            server.stop()


@pytest.fixture(autouse=True)
def cli_env(market: Market, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("INFERLEDGER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("INFERLEDGER_HOME", str(market.home))
    monkeypatch.setenv("INFERLEDGER_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("INFERLEDGER_CHAIN_URL", market.chain.url)
    monkeypatch.setenv("INFERLEDGER_DEPLOYMENT_FILE", str(market.deployment))
    monkeypatch.setenv("INFERLEDGER_KEY", "0x" + dev_account("user").key.hex())
    monkeypatch.setenv("INFERLEDGER_HOST_KEY", "0x" + dev_account("host").key.hex())


def invoke(*args: str, stdin: str | None = None) -> Result:
    result = CliRunner().invoke(app, list(args), input=stdin)
    assert result.exit_code == 0, result.output
    return result


def session_id_of(output: str) -> int:
    match = re.search(r"session (\d+) open with host", output)
    assert match, output
    return int(match.group(1))


def test_interactive_chat_streams_shows_the_cost_and_settles_on_quit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(chat_cmd, "_stdin_is_terminal", lambda: True)
    result = invoke(
        "chat", "--model", MODEL, "--max-tokens", "7", stdin="What is a token?\n\nAnd?\n/quit\n"
    )
    assert result.stdout.count("assistant> ") == 2
    # Prompts are free on this host: the cost is 7 tokens x 0.002 per reply, input shown.
    first = re.search(r"\[7 tokens for a (\d+)-token prompt; session (\d+) input \+ 7 output "
                      r"tokens, cost so far 0.014000 of 2.000000 USDC", result.stderr)  # fmt: skip
    assert first and first.group(1) == first.group(2), result.stderr
    second = re.search(r"session (\d+) input \+ 14 output tokens, cost so far 0.028000 of "
                       r"2.000000 USDC", result.stderr)  # fmt: skip
    assert second and int(second.group(1)) > int(first.group(2)), result.stderr
    assert re.search(rf"session \d+ settled: {second.group(1)} input \+ 14 output tokens; host "
                     r"0.025200, fee 0.002800, refund 1.972000 USDC", result.stderr)  # fmt: skip


def test_piped_stdin_is_one_message() -> None:
    result = invoke("chat", "--model", MODEL, "--max-tokens", "4", "--deposit", "0.5",
                    stdin="Summarise the ledger.\n")  # fmt: skip
    assert result.stdout.strip()  # the reply
    assert f"{MODEL} (0x" in result.stderr  # the model's approved name, read from the chain
    assert re.search(r"session \d+ settled: [1-9]\d* input \+ 4 output tokens", result.stderr)
    assert "refund 0.492000 USDC" in result.stderr


def test_a_kept_open_session_is_resumed_then_closed() -> None:
    opened = invoke("chat", "--model", MODEL, "-m", "hello", "--max-tokens", "5", "--keep-open")
    session_id = session_id_of(opened.stderr)
    assert f"session {session_id} left open" in opened.stderr

    resumed = invoke("chat", "--session", str(session_id), "-m", "more", "--max-tokens", "5",
                     "--keep-open")  # fmt: skip
    first_input = re.search(rf"session {session_id} resumed: (\d+) input \+ 5 output tokens "
                            "so far", resumed.stderr)  # fmt: skip
    assert first_input and int(first_input.group(1)) > 0, resumed.stderr
    assert "cost so far 0.020000" in resumed.stderr
    billed = re.search(r"session (\d+) input \+ 10 output tokens", resumed.stderr)
    assert billed and int(billed.group(1)) > int(first_input.group(1))
    input_tokens = billed.group(1)

    listed = invoke("session", "list")
    row = rf"│ {session_id} +│ open +│ {input_tokens}/10 +│ 0/0 +│"
    assert re.search(row, listed.stdout), listed.stdout

    closed = invoke("session", "close", str(session_id))
    assert (f"session {session_id} settled: {input_tokens} input + 10 output tokens; host "
            "0.018000") in closed.stdout  # fmt: skip

    shown = invoke("session", "show", str(session_id))
    assert f"session {session_id}: settled" in shown.stdout
    assert f"tokens paid input {input_tokens}, output 10" in shown.stdout
    assert "price       input 0, output 0.002 USDC/token" in shown.stdout
    assert (f"replies     2: {input_tokens} input tokens billed, 10 output tokens "
            "received") in shown.stdout  # fmt: skip
    assert f"the last for {input_tokens} input + 10 output tokens" in shown.stdout
    assert "closed      settled" in shown.stdout


def test_close_without_a_record_requests_it_on_chain_then_finalize_settles(
    market: Market, tmp_path: Path
) -> None:
    elsewhere = Client(
        market.chain,
        key="0x" + dev_account("user").key.hex(),
        deployment=market.deployment,
        sessions_dir=tmp_path / "other-machine",
    )
    session = elsewhere.sessions.open(market.world.host.address, market.model_id, usdc("1"))
    session.detach()

    closed = invoke("session", "close", str(session.id))
    assert f"session {session.id} closing: 0 input + 0 output tokens" in closed.stdout
    assert "no local record" in closed.stdout

    early = CliRunner().invoke(app, ["session", "finalize", str(session.id)])
    assert early.exit_code == 1
    assert "can be finalized after" in early.stderr

    market.chain.time_travel(market.world.contracts.deployment.params.close_window + 5)
    final = invoke("session", "finalize", str(session.id))
    assert f"session {session.id} settled: 0 input + 0 output tokens" in final.stdout
    assert "refund 1.000000 USDC" in final.stdout


def test_host_update_changes_one_price_and_keeps_the_url(market: Market) -> None:
    before = invoke("host", "show").stdout
    model = f"model 0x{market.model_id.hex()}"
    assert f"{model}: input 0, output 0.002 USDC/token" in before
    try:
        updated = invoke("host", "update", "--output-price", "0.003")
        assert "input 0, output 0.003 USDC/token" in updated.stdout
        # --price is --output-price; the input price changes on its own.
        invoke("host", "update", "--input-price", "0.0005")
        after = invoke("host", "show").stdout
        assert f"{model}: input 0.0005, output 0.003 USDC/token" in after
        url = re.search(r"url +(\S+)", before)
        assert url and url.group(1) in after
    finally:
        invoke("host", "update", "--model", MODEL, "--input-price", "0", "--price", "0.002")
    assert f"{model}: input 0, output 0.002 USDC/token" in invoke("host", "show").stdout


def test_list_and_show_learn_a_settlement_that_landed_after_close_fell_back(
    market: Market,
) -> None:
    """The client loses the node (here a cut link), so close() falls back to request_close
    and the record says "closing"; the node, still up, settles on the close request.
    `session list` updates the record from the chain, and `session show` prints it."""
    c = market.world.contracts
    node_url = c.nodes.get_host(market.world.host.address).api_url
    host, port = node_url.removeprefix("http://").split(":")
    link = TcpProxy((host, int(port)))
    client = Client(
        market.chain, key="0x" + dev_account("user").key.hex(), deployment=market.deployment
    )
    session = client.sessions.open(
        market.world.host.address, market.model_id, usdc("1"), url=link.url
    )
    session.chat_sync([{"role": "user", "content": "hello"}], max_tokens=6)
    link.cut()
    closing = session.close(timeout=5)
    assert closing.status == "closing", closing
    wait_until(
        lambda: c.marketplace.get_session(session.id).is_settled, "the node's settlement", 60
    )
    stale = SessionRecord.model_validate_json(session.record_path.read_text())
    assert stale.settlement is not None and stale.settlement["status"] == "closing"

    listed = invoke("session", "list")
    assert re.search(rf"│ {session.id} +│ settled +│", listed.stdout), listed.stdout
    saved = SessionRecord.model_validate_json(session.record_path.read_text())
    assert saved.settlement is not None and saved.settlement["status"] == "settled"
    paid = (saved.settlement["input_tokens"], saved.settlement["output_tokens"])
    assert paid == (session.input_tokens, 6)

    shown = invoke("session", "show", str(session.id))
    assert (f"closed      settled (reported by the chain): {session.input_tokens} input + 6 "
            "output tokens paid") in shown.stdout  # fmt: skip
