"""Provers: activation over segments, commitment, mock, the external contract, the fallback."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from eth_account import Account
from eth_utils import keccak

from inferledger.inference import load_backend
from inferledger.proofs.activation import build_chunk_proofs, segment_chunks
from inferledger.proofs.bundle import ProofBundle, mask_proof, prompt_hash
from inferledger.proofs.provers import (
    ActivationProver,
    CheckpointWork,
    CommitmentProver,
    ExternalProver,
    MockProver,
    ProverFailed,
    ProverUnavailable,
    SegmentWork,
    make_prover,
    prove_checkpoint,
)

HOST_KEY = bytes.fromhex("22" * 32)
HOST = Account.from_key(HOST_KEY).address
MARKETPLACE = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "provers" / "hash_prover.py"

SALT = keccak(b"salt")
PROMPT = tuple(range(1, 31))
REPLY = tuple(256 + (3 * i) % 20 for i in range(100))


@pytest.fixture(scope="module")
def states() -> np.ndarray:
    backend = load_backend("scripted", tokens_per_second=0, hidden_size=128)
    return backend.prefill_hidden_states(PROMPT + REPLY)


def make_work(states: np.ndarray | None, reply_start: int = 0, reply_end: int = 70):
    """One reply's tokens [reply_start, reply_end) as a checkpoint, rows sliced as a node would."""
    segment = SegmentWork(PROMPT, REPLY[:reply_end], reply_start, None)
    if states is not None:
        positions = segment.positions
        segment = replace(segment, hidden_states=states[positions.start : positions.stop])
    return CheckpointWork(
        session_id=5,
        chain_id=31337,
        marketplace=MARKETPLACE,
        checkpoint_index=1 if reply_start == 0 else 2,
        model_id=keccak(b"scripted/words"),
        token_start=reply_start,
        token_end=reply_end,
        transcript_hash=keccak(b"chain"),
        segments=(segment,),
        backend="scripted",
        dtype="float32",
        salt=SALT,
    )


# Activation -------------------------------------------------------------------------


def test_activation_proofs_follow_the_segment_chunks(states):
    first = ActivationProver().prove(make_work(states, 0, 70))
    (segment,) = first.segments
    chunks = segment_chunks(len(PROMPT), 0, 70)  # prompt, 32, 38
    assert len(chunks) == 3
    assert unmasked(segment.activation_proofs, 1) == tuple(build_chunk_proofs(states, 0, chunks))
    assert (segment.prompt_hash, segment.prompt_tokens) == (prompt_hash(PROMPT, SALT), 30)
    assert (first.prover, first.unproven, first.host_signature) == ("activation", False, b"")

    second = ActivationProver().prove(make_work(states, 70, 100))  # only rows 100..130 kept
    (tail,) = second.segments
    assert (tail.reply_start, tail.reply_end, len(tail.activation_proofs)) == (70, 100, 1)
    assert unmasked(tail.activation_proofs, 2) == tuple(
        build_chunk_proofs(states, 0, segment_chunks(len(PROMPT), 70, 100))
    )
    assert tail.activation_proofs != unmasked(tail.activation_proofs, 2)  # public: masked


def unmasked(proofs: tuple[bytes, ...], checkpoint: int) -> tuple[bytes, ...]:
    """A one-segment bundle's activation proofs as the prover computed them."""
    return tuple(mask_proof(p, SALT, checkpoint, 0, i) for i, p in enumerate(proofs))


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (None, "segment 0: the backend gave no hidden states"),
        (np.zeros((99, 128), np.float32), r"shape \(99, 128\), expected 100 rows .*\[0, 100\)"),
        (np.zeros((100, 4), np.float32), "segment 0: topk must be in"),
    ],
    ids=["missing", "wrong-rows", "too-narrow"],
)
def test_activation_prover_fails_on_unusable_states(rows, message):
    work = make_work(None)
    work = replace(work, segments=(replace(work.segments[0], hidden_states=rows),))
    with pytest.raises(ProverFailed, match=message):
        ActivationProver().prove(work)


# Commitment and mock ----------------------------------------------------------------


def test_commitment_and_mock_carry_no_proofs(states, caplog):
    work = make_work(states)
    assert CommitmentProver().prove(work).prover == "commitment"
    assert CommitmentProver(unproven=True).prove(work).unproven
    with caplog.at_level(logging.WARNING, logger="inferledger.proofs.provers"):
        bundles = [MockProver().prove(work) for _ in range(2)]
    assert all(b.prover == "mock" and not b.segments[0].activation_proofs for b in bundles)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("proves nothing" in r.getMessage() for r in warnings)


# The factory ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "dev_chain", "hidden", "expected"),
    [
        ("auto", False, True, ActivationProver),
        ("auto", False, False, CommitmentProver),
        ("activation", False, True, ActivationProver),
        ("commitment", False, True, CommitmentProver),
        ("mock", True, False, MockProver),
    ],
)
def test_make_prover(name, dev_chain, hidden, expected):
    prover = make_prover(name, dev_chain=dev_chain, hidden_states=hidden)
    assert type(prover) is expected
    assert prover.needs_hidden_states == (expected is ActivationProver)
    assert prover.preflight()


@pytest.mark.parametrize(
    ("name", "options", "line"),
    [
        (
            "activation",
            {"hidden_states": False},
            "prover 'activation': the backend exposes no hidden states; setting "
            "INFERLEDGER_PROVER; fix: use prover commitment (INFERLEDGER_PROVER=commitment)",
        ),
        (
            "mock",
            {"hidden_states": True},
            "prover 'mock': mock proofs are refused on a non-dev chain; setting INFERLEDGER_PROVER",
        ),
        (
            "external",
            {"hidden_states": True},
            "prover 'external': no external prover configured; setting INFERLEDGER_EXTERNAL_PROVER",
        ),
        ("zk", {"hidden_states": True}, "prover 'zk': unknown prover; setting INFERLEDGER_PROVER"),
    ],
)
def test_make_prover_refuses_with_one_line(name, options, line):
    with pytest.raises(ProverUnavailable) as caught:
        make_prover(name, dev_chain=False, **options)
    assert caught.value.line().startswith(line)
    assert str(caught.value) == caught.value.line() and "\n" not in str(caught.value)


# prove_checkpoint -------------------------------------------------------------------


def test_prove_checkpoint_signs_and_hashes_the_bundle(states):
    proved = prove_checkpoint(ActivationProver(), make_work(states), HOST_KEY)
    assert not proved.fell_back and proved.error is None
    assert proved.bundle.host_signer() == HOST
    assert proved.encoded == proved.bundle.encode()
    assert proved.proof_hash == keccak(proved.encoded) == proved.bundle.proof_hash()
    assert ProofBundle.decode(proved.encoded) == proved.bundle
    assert proved.seconds > 0


class Exploding:
    name = "exploding"
    needs_hidden_states = False

    def preflight(self) -> str:
        return "ok"

    def prove(self, work: CheckpointWork) -> ProofBundle:
        raise RuntimeError("out of\nmemory")


@pytest.mark.parametrize(
    ("prover", "error"),
    [
        (ActivationProver(), "activation prover failed: segment 0: the backend gave no hidden"),
        (Exploding(), "exploding prover failed: RuntimeError: out of memory"),
    ],
    ids=["prover-failed", "any-exception"],
)
def test_a_failing_prover_falls_back_to_an_unproven_commitment(prover, error):
    proved = prove_checkpoint(prover, make_work(None), HOST_KEY)
    assert proved.fell_back and proved.error is not None and proved.error.startswith(error)
    bundle = proved.bundle
    assert (bundle.prover, bundle.unproven) == ("commitment", True)
    assert bundle.host_signer() == HOST and proved.proof_hash == keccak(proved.encoded)
    assert (bundle.token_start, bundle.token_end) == (0, 70)  # the receipt still pays for these


# External ---------------------------------------------------------------------------


def wrapper(tmp_path: Path, *flags: str, body: str | None = None) -> Path:
    """An executable script running the example prover with ``flags`` (or ``body``)."""
    script = tmp_path / "prover.sh"
    run = f"echo $$ > {tmp_path}/pid\nexec {sys.executable} {EXAMPLE} {' '.join(flags)}"
    script.write_text(f"#!/bin/sh\n{body or run}\n")
    script.chmod(0o755)
    return script


def test_the_example_prover_answers_the_handshake_as_shipped():
    assert ExternalProver(EXAMPLE, timeout=30).preflight() == (
        f"external prover hash_prover 1.0 at {EXAMPLE}"
    )


def test_external_prover_attests_the_exact_request(tmp_path, states):
    work = make_work(states, 70, 100)
    proved = prove_checkpoint(ExternalProver(wrapper(tmp_path), timeout=30), work, HOST_KEY)
    assert not proved.fell_back, proved.error
    request = {
        "op": "prove",
        "protocol": "inferledger-prover/1",
        "session_id": 5,
        "chain_id": 31337,
        "marketplace": MARKETPLACE,
        "checkpoint_index": 2,
        "model_id": "0x" + keccak(b"scripted/words").hex(),
        "token_start": 70,
        "token_end": 100,
        "transcript_hash": "0x" + keccak(b"chain").hex(),
        "salt": "0x" + SALT.hex(),
        "segments": [{"prompt_ids": list(PROMPT), "reply_ids": list(REPLY), "reply_start": 70}],
    }
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":")).encode()
    assert proved.bundle.prover == "external"
    assert proved.bundle.attestation == hashlib.sha256(canonical).digest()
    assert proved.bundle.segments[0].activation_proofs == ()


@pytest.mark.parametrize(
    ("setup", "detail", "setting", "fix"),
    [
        ("missing", "external prover {path} not found", "PROVER", "install the prover there"),
        ("directory", "external prover {path} is not a file", "PROVER", "point INFERLEDGER"),
        ("not-executable", "external prover {path} is not executable", "PROVER", "`chmod +x"),
        (
            "wrong-protocol",
            "handshake failed: answered protocol 'other-prover/9'",
            "PROVER",
            "make it",
        ),
        ("not-json", "handshake failed: did not answer with one JSON object", "PROVER", "make it"),
        ("exits", "handshake failed: exited with status 5: no licence", "PROVER", "make it"),
        ("hangs", "handshake failed: no answer within 0.5 s (killed)", "PROVER_TIMEOUT", "raise"),
    ],
)
def test_external_preflight_names_the_problem(tmp_path, setup, detail, setting, fix):
    path = {
        "missing": lambda: tmp_path / "nowhere",
        "directory": lambda: tmp_path,
        "wrong-protocol": lambda: wrapper(tmp_path, "--wrong-protocol"),
        "not-json": lambda: wrapper(tmp_path, body="echo hello"),
        "exits": lambda: wrapper(tmp_path, body="echo no licence >&2; exit 5"),
        "hangs": lambda: wrapper(tmp_path, body="sleep 30"),
        "not-executable": lambda: wrapper(tmp_path),
    }[setup]()
    if setup == "not-executable":
        path.chmod(0o644)
    started = time.monotonic()
    with pytest.raises(ProverUnavailable) as caught:
        ExternalProver(path, timeout=0.5).preflight()
    assert time.monotonic() - started < 10
    error = caught.value
    assert detail.format(path=path) in error.detail
    assert error.setting == f"INFERLEDGER_EXTERNAL_{setting}"
    assert error.fix.startswith(fix)
    assert error.line().startswith(f"prover 'external': external prover {path}")


def test_a_crashing_external_prover_falls_back(tmp_path, states):
    prover = ExternalProver(wrapper(tmp_path, "--crash-on-prove"), timeout=30)
    assert prover.preflight().startswith("external prover hash_prover")
    proved = prove_checkpoint(prover, make_work(states), HOST_KEY)
    assert proved.error == (
        "external prover failed: exited with status 3: "
        "hash_prover: crashing on purpose (--crash-on-prove)"
    )
    assert proved.bundle.unproven


def test_a_hanging_external_prover_is_killed(tmp_path, states):
    prover = ExternalProver(wrapper(tmp_path, "--hang-on-prove"), timeout=1)
    started = time.monotonic()
    with pytest.raises(ProverFailed, match=r"no answer within 1 s \(killed\)"):
        prover.prove(make_work(states))
    assert time.monotonic() - started < 10
    pid = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
