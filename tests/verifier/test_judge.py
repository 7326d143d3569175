"""A juror's verdict: fraud only when the transcript matches everything the host signed and
the model re-run does not; a challenger's forged or partial evidence is never fraud."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pytest
from eth_account import Account
from eth_utils import keccak

from inferledger.inference import load_backend
from inferledger.proofs.bundle import ProofBundle
from inferledger.proofs.evidence import RevealedReply, Transcript
from inferledger.proofs.provers import (
    ActivationProver,
    CheckpointWork,
    CommitmentProver,
    Prover,
    SegmentWork,
    prove_checkpoint,
)
from inferledger.proofs.transcript import TranscriptHash
from inferledger.verifier.judge import DisputedCheckpoint, judge

HOST_KEY = bytes.fromhex("33" * 32)
HOST = Account.from_key(HOST_KEY).address
MARKETPLACE = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
SESSION_ID = 7
CHAIN_ID = 31337
SALT = keccak(b"a session salt")
MESSAGES = [{"role": "user", "content": "Tell me about lighthouses."}]

SCRIPTED = load_backend("scripted", tokens_per_second=0, hidden_size=64)
MODEL_ID = keccak(text=SCRIPTED.name)
REPLY = tuple(range(257, 287))  # 30 generated ids


@dataclass(frozen=True)
class Case:
    bundle: ProofBundle
    transcript: Transcript
    dispute: DisputedCheckpoint

    def judged(self, bundle: bytes | None = None, transcript: bytes | None = None, **facts):
        dispute = replace(self.dispute, **facts)
        return judge(
            dispute,
            self.bundle.encode() if bundle is None else bundle,
            self.transcript.encode() if transcript is None else transcript,
            SCRIPTED,
        )


def build(
    computed: Callable[[Sequence[int]], np.ndarray] = SCRIPTED.prefill_hidden_states,
    prover: Prover | None = None,
    model_id: bytes = MODEL_ID,
    key: bytes = HOST_KEY,
) -> Case:
    """One reply, one checkpoint over all of it, proved from the rows ``computed`` gives
    (the host's forward pass) and signed by ``key``."""
    prompt = tuple(SCRIPTED.tokenize_chat(MESSAGES))
    chain = TranscriptHash(SESSION_ID)
    for token in REPLY:
        chain.update(token)
    rows = np.asarray(computed([*prompt, *REPLY]))
    segment = replace(SegmentWork(prompt, REPLY, 0), hidden_states=rows)
    work = CheckpointWork(
        session_id=SESSION_ID,
        chain_id=CHAIN_ID,
        marketplace=MARKETPLACE,
        checkpoint_index=1,
        model_id=model_id,
        token_start=0,
        token_end=len(REPLY),
        transcript_hash=chain.value,
        segments=(segment,),
        backend="scripted",
        dtype="float32",
        salt=SALT,
        sampler="scripted",
    )
    bundle = prove_checkpoint(prover or ActivationProver(), work, key).bundle
    transcript = Transcript(
        session_id=SESSION_ID,
        chain_id=CHAIN_ID,
        marketplace=MARKETPLACE,
        host=HOST,
        model_id="0x" + MODEL_ID.hex(),
        salt="0x" + SALT.hex(),
        replies=[RevealedReply(messages=MESSAGES, first_token=0, token_ids=list(REPLY))],
    )
    dispute = DisputedCheckpoint(
        dispute_id=1,
        session_id=SESSION_ID,
        chain_id=CHAIN_ID,
        marketplace=MARKETPLACE,
        host=HOST,
        model_id=MODEL_ID,
        checkpoint_index=1,
        bundle_hash=bundle.signing_hash(),
        transcript_commitment=transcript.commitment(),
    )
    return Case(bundle, transcript, dispute)


def cheating(ids: Sequence[int]) -> np.ndarray:
    """Another model: the honest rows with every value nudged."""
    return SCRIPTED.prefill_hidden_states(ids) * np.float32(1.01)


def test_an_honest_host_is_not_fraudulent() -> None:
    verdict = build().judged()
    assert (verdict.fraud, verdict.stage) == (False, "model")
    assert verdict.reason.startswith("the host's proof holds")


def test_a_host_that_ran_another_model_is_fraudulent() -> None:
    verdict = build(cheating).judged()
    assert (verdict.fraud, verdict.stage) == (True, "model")
    assert "segment 0" in verdict.reason


def test_a_bundle_naming_another_model_than_the_session_pays_for_is_fraud() -> None:
    verdict = build(model_id=keccak(b"a cheaper model")).judged()
    assert (verdict.fraud, verdict.stage) == (True, "claim")


def _forged(case: Case, **changes) -> Transcript:
    return case.transcript.model_copy(update=changes)


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(
            lambda c: [
                RevealedReply(
                    messages=[{"role": "user", "content": "Something else"}],
                    first_token=0,
                    token_ids=list(REPLY),
                )
            ],
            id="another-prompt",
        ),
        pytest.param(
            lambda c: [
                RevealedReply(
                    messages=MESSAGES, first_token=0, token_ids=[REPLY[0] + 1, *REPLY[1:]]
                )
            ],
            id="another-token",
        ),
        pytest.param(
            lambda c: [RevealedReply(messages=MESSAGES, first_token=0, token_ids=list(REPLY[:-3]))],
            id="tokens-withheld",
        ),
        pytest.param(
            lambda c: [
                RevealedReply(
                    messages=MESSAGES,
                    params={"temperature": 0.7, "seed": 3},
                    first_token=0,
                    token_ids=list(REPLY),
                )
            ],
            id="other-sampling",
        ),
    ],
)
def test_a_forged_transcript_never_convicts_an_honest_host(forge) -> None:
    """The challenger commits to (and reveals) a transcript the host never served: the
    juror finds it does not match the host's signed commitments, so no fraud."""
    case = build()
    forged = _forged(case, replies=forge(case))
    verdict = case.judged(transcript=forged.encode(), transcript_commitment=forged.commitment())
    assert (verdict.fraud, verdict.stage) == (False, "evidence"), verdict.reason
    assert "does not match what the host signed" in verdict.reason


def test_a_wrong_salt_never_convicts() -> None:
    case = build()
    forged = _forged(case, salt="0x" + keccak(b"guess").hex())
    verdict = case.judged(transcript=forged.encode(), transcript_commitment=forged.commitment())
    assert (verdict.fraud, verdict.stage) == (False, "evidence")


@pytest.mark.parametrize(
    ("evidence", "reason"),
    [
        ({"transcript": b'{"other": 1}'}, "does not hash to"),
        ({"bundle": b"{}"}, "not a proof bundle"),
    ],
)
def test_evidence_that_is_not_the_disputes_is_refused(evidence, reason) -> None:
    verdict = build().judged(**evidence)
    assert (verdict.fraud, verdict.stage) == (False, "evidence")
    assert reason in verdict.reason.replace("hashes to", "does not hash to")


def test_a_bundle_other_than_the_disputed_one_is_refused() -> None:
    case, other = build(), build(cheating)
    verdict = case.judged(bundle=other.bundle.encode())
    assert (verdict.fraud, verdict.reason) == (
        False,
        "the revealed bundle is not the one the dispute names",
    )


def test_evidence_never_revealed_is_no_fraud() -> None:
    case = build(cheating)
    verdict = judge(case.dispute, None, None, SCRIPTED)
    assert (verdict.fraud, verdict.stage) == (False, "evidence")
    assert "never revealed" in verdict.reason


@pytest.mark.parametrize(
    ("facts", "reason"),
    [
        ({"session_id": 8}, "the bundle is for session"),
        ({"checkpoint_index": 2}, "the bundle is checkpoint 1"),
    ],
)
def test_a_bundle_for_another_session_or_checkpoint_is_not_fraud_here(facts, reason) -> None:
    """A host's bad proof of session 7 says nothing about session 8."""
    verdict = build(cheating).judged(**facts)
    assert (verdict.fraud, verdict.stage) == (False, "evidence")
    assert verdict.reason.startswith(reason)


def test_a_commitment_bundle_shows_nothing_either_way() -> None:
    verdict = build(cheating, prover=CommitmentProver()).judged()
    assert (verdict.fraud, verdict.stage) == (False, "model")
    assert verdict.reason.startswith("nothing shown against the host")
