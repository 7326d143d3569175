"""`inferledger verify` and sdk.verification on a real session: a scripted node on loopback,
the embedded chain, a session opened and closed through the SDK in this process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_utils import keccak
from typer.testing import CliRunner

from inferledger.chain.anvil import free_port
from inferledger.chain.connect import connect
from inferledger.chain.devchain import build_dev_world, dev_account
from inferledger.chain.units import usdc
from inferledger.cli.main import app
from inferledger.config import load_settings
from inferledger.inference import load_backend
from inferledger.node.node import create_node
from inferledger.node.server import BackgroundServer
from inferledger.node.state import NodeState
from inferledger.sdk import Client, SessionRecord, lifecycle
from inferledger.sdk.verification import (
    BundleUnavailable,
    checkpoints,
    fetch_bundles,
    verify_session,
)

PROOF_INTERVAL = 10


@pytest.fixture(scope="module")
def settled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SessionRecord, Path]]:
    """A session of two replies (25 + 12 tokens, receipts every 10), closed and settled;
    its record and the INFERLEDGER_HOME it lives in. The node keeps serving its proofs."""
    tmp = tmp_path_factory.mktemp("verify")
    chain = connect()
    world = build_dev_world(chain)
    backend = load_backend("scripted", tokens_per_second=0)
    c = world.contracts
    model_id = c.models.approve_model(world.owner, backend.name, keccak(text="scripted"))
    c.nodes.set_models(world.host, {model_id: (0, 2_000_000_000)})
    settings = load_settings(
        host_key="0x" + dev_account("host").key.hex(),
        chain_url=chain.url,
        state_db=tmp / "node.sqlite3",
        proof_store=tmp / "proofs",
    )
    node = create_node(
        settings, contracts=c, backend=backend, state=NodeState(tmp / "node.sqlite3")
    )
    server = BackgroundServer(node).start()
    try:
        c.nodes.update_url(world.host, server.url)
        home = tmp / "home"
        client = Client(
            chain,
            key="0x" + dev_account("user").key.hex(),
            deployment=c.deployment,
            sessions_dir=home / "sessions",
        )
        with client.sessions.open(
            world.host.address, model_id, usdc("2"), proof_interval=PROOF_INTERVAL
        ) as session:
            first = [{"role": "user", "content": "What is a receipt?"}]
            reply = session.chat_sync(first, max_tokens=25)
            follow_up = [*first, {"role": "assistant", "content": reply.text}]
            session.chat_sync([*follow_up, {"role": "user", "content": "Why?"}], max_tokens=12)
        assert session.settlement is not None and session.settlement.settled
        yield session.record, home
    finally:
        for open_session in lifecycle.open_sessions():
            lifecycle.unregister(open_session)
        server.stop()


def _verify(home: Path, *args: str, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    monkeypatch.setenv("INFERLEDGER_HOME", str(home))
    monkeypatch.delenv("INFERLEDGER_DEPLOYMENT_FILE", raising=False)
    result = CliRunner().invoke(app, ["verify", *args, "--backend", "scripted"])
    return result.exit_code, result.output


def test_verify_passes_every_checkpoint_of_an_honest_session(
    settled: tuple[SessionRecord, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    record, home = settled
    points = checkpoints(record)
    # 25 tokens: receipts at 10, 20 and the tail 25; 12 more: 30, then the tail 37.
    assert [(p.token_start, p.token_end) for p in points] == [
        (0, 10), (10, 20), (20, 25), (25, 30), (30, 37),
    ]  # fmt: skip
    code, output = _verify(home, str(record.session_id), monkeypatch=monkeypatch)
    assert code == 0, output
    assert "5 pass, 0 fail, 0 unproven" in output


def test_verify_fails_a_tampered_transcript(
    settled: tuple[SessionRecord, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    record, home = settled
    tampered = record.model_copy(deep=True)
    # The user claims the second prompt was something else: its checkpoints must fail.
    tampered.replies[1].messages[-1]["content"] = "Why not?"
    path = tmp_path / "tampered.json"
    path.write_text(tampered.model_dump_json())
    code, output = _verify(
        home, str(record.session_id), "--record", str(path), monkeypatch=monkeypatch
    )
    assert code == 1, output
    assert "3 pass, 2 fail, 0 unproven" in output
    assert "prompt_hash differs" in output


def test_verify_fails_a_checkpoint_whose_bundle_is_not_served(
    settled: tuple[SessionRecord, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    record, home = settled
    moved = record.model_copy(update={"node_url": f"ws://127.0.0.1:{free_port()}/v1/ws"})
    path = tmp_path / "moved.json"
    path.write_text(json.dumps(json.loads(moved.model_dump_json())))
    code, output = _verify(
        home, str(record.session_id), "--record", str(path), monkeypatch=monkeypatch
    )
    assert code == 1, output
    assert "0 pass, 5 fail" in output and "cannot fetch" in output
    with pytest.raises(BundleUnavailable, match="cannot fetch the proof bundle"):
        fetch_bundles(moved)


def test_sdk_verification_for_the_demo(settled: tuple[SessionRecord, Path]) -> None:
    record, _ = settled
    backend = load_backend("scripted")
    bundles = fetch_bundles(record)
    assert [b.token_end for b in bundles] == [10, 20, 25, 30, 37]
    verdicts = list(
        verify_session(record, bundles, backend.prefill_hidden_states, backend.tokenize_chat)
    )
    assert [v.status for v in verdicts] == ["pass"] * 5
    assert all(v.prover == "activation" for v in verdicts)
    # Without a model to prefill with, the activation proofs are not re-run.
    unproven = verify_session(record, bundles, None, backend.tokenize_chat)
    assert {v.status for v in unproven} == {"unproven"}
    # A bundle left out fails its checkpoint, not the others.
    partial = list(
        verify_session(record, bundles[1:], backend.prefill_hidden_states, backend.tokenize_chat)
    )
    assert [v.status for v in partial] == ["fail"] + ["pass"] * 4
    assert partial[0].reason == "no proof bundle for this receipt"
