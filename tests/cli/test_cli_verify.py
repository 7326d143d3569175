"""`inferledger verify` and sdk.verification on a real session: a scripted node on loopback,
the embedded chain, a session opened and closed through the SDK in this process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from eth_utils import keccak
from node_support import ONE_TOKEN_STEPS, generation_steps
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
    unnamed_receipts,
    verify_session,
)

PROOF_INTERVAL = 10
WHY = {"role": "user", "content": "Why?"}
NO_BUNDLE = "0x" + "00" * 32


@dataclass
class Sessions:
    """Two sessions closed and settled on one node, which keeps serving their proofs.

    ``settled``: two replies (25 + 12 tokens) with a proof every 10 tokens, so every
    receipt names a bundle. ``early``: two replies (40 + 10 tokens) with a proof every
    100, so the node asks for receipts at 16 and 32 before the first bundle exists
    (they name the zero hash), then one naming each reply's tail bundle.
    """

    settled: SessionRecord
    early: SessionRecord
    home: Path


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sessions]:
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
    # Where receipts fall is pinned (a model's one token a step): the tests below name them.
    with generation_steps(ONE_TOKEN_STEPS):
        try:
            c.nodes.update_url(world.host, server.url)
            home = tmp / "home"
            client = Client(
                chain,
                key="0x" + dev_account("user").key.hex(),
                deployment=c.deployment,
                sessions_dir=home / "sessions",
            )
            records = []
            for interval, lengths in ((PROOF_INTERVAL, (25, 12)), (100, (40, 10))):
                with client.sessions.open(
                    world.host.address, model_id, usdc("2"), proof_interval=interval
                ) as session:
                    first = [{"role": "user", "content": "What is a receipt?"}]
                    reply = session.chat_sync(first, max_tokens=lengths[0])
                    follow_up = [*first, {"role": "assistant", "content": reply.text}, WHY]
                    session.chat_sync(follow_up, max_tokens=lengths[1])
                assert session.settlement is not None and session.settlement.settled
                records.append(session.record)
            yield Sessions(records[0], records[1], home)
        finally:
            for open_session in lifecycle.open_sessions():
                lifecycle.unregister(open_session)
            server.stop()


@pytest.fixture
def settled(sessions: Sessions) -> tuple[SessionRecord, Path]:
    return sessions.settled, sessions.home


def _write(record: SessionRecord, path: Path) -> Path:
    path.write_text(json.dumps(json.loads(record.model_dump_json())))
    return path


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
    # 25 tokens: receipts at 10, 20 and the tail 25; 12 more: 30, then the tail 37. Each
    # names the bundle built just before it, so each bundle ends where its receipt does.
    assert [r.tokens for r in record.receipts] == [10, 20, 25, 30, 37]
    assert [(p.ends_from, p.ends_by) for p in points] == [
        (0, 10), (10, 20), (20, 25), (25, 30), (30, 37),
    ]  # fmt: skip
    assert [p.proof_hash_hex for p in points] == [r.proof_hash for r in record.receipts]
    evidence = home / "evidence.json"
    code, output = _verify(
        home, str(record.session_id), "--json", str(evidence), monkeypatch=monkeypatch
    )
    assert code == 0, output
    assert "5 pass, 0 fail, 0 unproven, 0 unverifiable" in output
    # What a dispute needs: every verdict with its measurements, and who measured.
    written = json.loads(evidence.read_text())
    assert written["session_id"] == record.session_id
    assert written["verifier"]["backend"] == "scripted"
    assert written["verifier"]["prefill_layout"].startswith("one prefill per reply")
    assert [c["status"] for c in written["checkpoints"]] == ["pass"] * 5
    for checkpoint in written["checkpoints"]:
        assert checkpoint["evidence"]["profile"] == "scripted"
        chunks = [c for segment in checkpoint["evidence"]["activation"] for c in segment]
        assert chunks and all(c["ok"] and c["exp_mismatches"] == 0 for c in chunks)


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
    path = _write(moved, tmp_path / "moved.json")
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
    assert partial[0].tokens == "?-10" and partial[1].tokens == "10-20"


def test_receipts_before_the_first_bundle_name_none_and_each_bundle_is_checked_once(
    sessions: Sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = sessions.early
    receipts = [(r.tokens, r.proof_hash) for r in record.receipts]
    assert [tokens for tokens, _ in receipts] == [16, 32, 40, 50]
    assert [h == NO_BUNDLE for _, h in receipts] == [True, True, False, False]
    assert unnamed_receipts(record) == 2
    points = checkpoints(record)
    assert [(p.ends_from, p.ends_by) for p in points] == [(32, 40), (40, 50)]
    bundles = fetch_bundles(record)  # the zero hash is never asked for
    assert [(b.token_start, b.token_end) for b in bundles] == [(0, 40), (40, 50)]
    backend = load_backend("scripted")
    verdicts = list(
        verify_session(record, bundles, backend.prefill_hidden_states, backend.tokenize_chat)
    )
    assert [(v.status, v.tokens) for v in verdicts] == [("pass", "0-40"), ("pass", "40-50")]

    code, output = _verify(sessions.home, str(record.session_id), monkeypatch=monkeypatch)
    assert code == 0, output
    assert "2 pass, 0 fail, 0 unproven" in output
    assert "2 of 4 receipts name no proof bundle" in output and "no failure" in output


def test_a_bundle_named_once_is_fetched_once(sessions: Sessions) -> None:
    record = sessions.settled.model_copy(deep=True)
    again = record.receipts[-1].model_copy()  # signed twice, e.g. across a reconnect
    record.receipts.append(again)
    assert len(checkpoints(record)) == 5 and len(fetch_bundles(record)) == 5


def test_a_named_bundle_that_is_missing_or_misplaced_fails(
    sessions: Sessions, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    home, session_id = sessions.home, str(sessions.early.session_id)
    # A receipt naming a bundle the node does not have: its checkpoint fails, not the rest.
    unknown = sessions.early.model_copy(deep=True)
    unknown.receipts[2].proof_hash = "0x" + "ee" * 32
    unknown.receipts[2].proof_uri = None
    code, output = _verify(
        home, session_id, "--record", str(_write(unknown, tmp_path / "unknown.json")),
        monkeypatch=monkeypatch,
    )  # fmt: skip
    assert code == 1, output
    assert "1 pass, 1 fail" in output and "PROOF_NOT_FOUND" in output

    # The bundles named in the wrong order: each sits where its receipts cannot put it.
    swapped = sessions.early.model_copy(deep=True)
    third, fourth = swapped.receipts[2], swapped.receipts[3]
    third.proof_hash, fourth.proof_hash = fourth.proof_hash, third.proof_hash
    third.proof_uri, fourth.proof_uri = fourth.proof_uri, third.proof_uri
    code, output = _verify(
        home, session_id, "--record", str(_write(swapped, tmp_path / "swapped.json")),
        monkeypatch=monkeypatch,
    )  # fmt: skip
    assert code == 1, output
    assert "0 pass, 2 fail" in output
    backend = load_backend("scripted")
    verdicts = list(
        verify_session(
            swapped, fetch_bundles(swapped), backend.prefill_hidden_states, backend.tokenize_chat
        )
    )
    assert [v.reason for v in verdicts] == [
        "the bundle ends at token 50, but the receipts naming it put its end between 32 and 40",
        "the bundle covers tokens [0, 40), which overlaps the previous bundle's (it ends at 50)",
    ]


def test_a_session_whose_receipts_name_no_bundle_yet_has_nothing_to_verify(
    sessions: Sessions, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    early = sessions.early.model_copy(deep=True)
    early.receipts = early.receipts[:2]  # as it stood after 32 tokens
    path = _write(early, tmp_path / "early.json")
    code, output = _verify(
        sessions.home, str(early.session_id), "--record", str(path), monkeypatch=monkeypatch
    )
    assert code == 0, output
    assert "its 2 receipts name no proof bundle yet" in output


def test_verify_can_rerun_the_model_in_llama_cpp() -> None:
    """``--backend llama_cpp``: the verifier's model is the same GGUF in llama.cpp, whose
    bundles' profile (llama_cpp) then applies to float32 hosts too."""
    pytest.importorskip("llama_cpp", reason="the llama extra: bash scripts/llama-wheel.sh")
    from rich.console import Console

    from inferledger.cli.verify_cmd import load_verifier_backend
    from inferledger.proofs.verify import VerifierModel

    backend = load_verifier_backend("llama_cpp", Console())
    try:
        model = VerifierModel.of(backend)
        assert (backend.engine, model.dtype) == ("llama_cpp", "q8_0")
        assert model.logits is not None
    finally:
        backend.close()
