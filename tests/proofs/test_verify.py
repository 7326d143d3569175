"""Verifying bundles against the kept transcript: scripted sessions, then real SmolLM2 runs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest
from eth_account import Account
from eth_utils import keccak
from model_edits import perturbed

from inferledger.inference import GenerationParams, load_backend
from inferledger.inference.base import Hidden, Token
from inferledger.inference.sampling import SAMPLER
from inferledger.proofs.bundle import ProofBundle
from inferledger.proofs.provers import (
    ActivationProver,
    CheckpointWork,
    CommitmentProver,
    MockProver,
    Prover,
    SegmentWork,
    prove_checkpoint,
)
from inferledger.proofs.transcript import TranscriptHash
from inferledger.proofs.verify import (
    ReplyTranscript,
    VerifierModel,
    reply_segments,
    verify_bundle,
)

HOST_KEY = bytes.fromhex("33" * 32)
HOST = Account.from_key(HOST_KEY).address
OTHER = Account.from_key(bytes.fromhex("44" * 32)).address
MARKETPLACE = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
MODEL_ID = keccak(b"model")
SESSION_ID = 9
SALT = keccak(b"the user's session salt")


def verify(bundle: ProofBundle, *args, **options):
    """verify_bundle as the user (or a verifier the user gave the salt) runs it."""
    return verify_bundle(bundle, *args, salt=SALT, **options)


def transcript(prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]):
    """The replies of one session, numbered by session token."""
    replies, first = [], 0
    for prompt, output in zip(prompts, outputs, strict=True):
        replies.append(ReplyTranscript(tuple(prompt), tuple(output), first))
        first += len(output)
    return replies


def checkpoint_works(
    replies: list[ReplyTranscript],
    rows: dict[int, np.ndarray],
    interval: int,
    backend: str = "scripted",
) -> list[CheckpointWork]:
    """What a node hands its prover at every ``interval`` session tokens. ``rows`` maps a
    reply's first token to its hidden states over prompt + output (what the host computed)."""
    tokens = [token for reply in replies for token in reply.reply_ids]
    works = []
    for index, start in enumerate(range(0, len(tokens), interval), start=1):
        end = min(start + interval, len(tokens))
        chain = TranscriptHash(SESSION_ID)
        for token in tokens[:end]:
            chain.update(token)
        segments = []
        for reply, reply_start, reply_end in reply_segments(replies, start, end):
            segment = SegmentWork(reply.prompt_ids, reply.reply_ids[:reply_end], reply_start)
            positions = segment.positions
            states = rows[reply.first_token][positions.start : positions.stop]
            segments.append(replace(segment, hidden_states=states))
        works.append(
            CheckpointWork(
                session_id=SESSION_ID,
                chain_id=31337,
                marketplace=MARKETPLACE,
                checkpoint_index=index,
                model_id=MODEL_ID,
                token_start=start,
                token_end=end,
                transcript_hash=chain.value,
                segments=tuple(segments),
                backend=backend,
                dtype="float32",
                salt=SALT,
                sampler=SAMPLER if backend == "transformers" else "scripted",
            )
        )
    return works


def prove_all(works: list[CheckpointWork], prover: Prover | None = None) -> list[ProofBundle]:
    proved = [prove_checkpoint(prover or ActivationProver(), work, HOST_KEY) for work in works]
    assert not any(p.fell_back for p in proved), [p.error for p in proved]
    return [p.bundle for p in proved]


# Scripted sessions --------------------------------------------------------------------

SCRIPTED = load_backend("scripted", tokens_per_second=0, hidden_size=128)
PROMPTS = [tuple(range(1 + i, 21 + 5 * i)) for i in range(3)]  # 20, 25 and 30 tokens
OUTPUTS = [tuple(256 + (5 * j + i) % 20 for j in range(n)) for i, n in enumerate((70, 50, 90))]
REPLIES = transcript(PROMPTS, OUTPUTS)  # session tokens [0, 70), [70, 120), [120, 210)


def scripted_rows(replies: list[ReplyTranscript]) -> dict[int, np.ndarray]:
    return {
        r.first_token: SCRIPTED.prefill_hidden_states(r.prompt_ids + r.reply_ids) for r in replies
    }


def no_model(ids: Sequence[int]) -> np.ndarray:
    raise AssertionError("this check must not need the model")


@pytest.fixture(scope="module")
def bundles() -> list[ProofBundle]:
    return prove_all(checkpoint_works(REPLIES, scripted_rows(REPLIES), 100))


def test_an_honest_session_passes_every_checkpoint(bundles):
    layout = [[(s.reply_start, s.reply_end) for s in b.segments] for b in bundles]
    assert layout == [[(0, 70), (0, 30)], [(30, 50), (0, 80)], [(80, 90)]]
    verdicts = [
        verify(b, REPLIES, SCRIPTED.prefill_hidden_states, host=HOST, model_id=MODEL_ID)
        for b in bundles
    ]
    assert [v.status for v in verdicts] == ["pass"] * 3
    assert verdicts[0].reason == "2 segments, 5 chunks within the scripted profile"  # 1+2, 1+1
    assert all(c.exp_mismatches == 0 for v in verdicts for s in v.segments for c in s.chunks)


def test_tokens_the_host_did_not_compute_fail_from_their_chunk_on():
    altered = list(OUTPUTS[2])
    altered[40] ^= 1  # the host computed another token 40 of the third reply than it sent
    rows = scripted_rows(REPLIES)
    rows[120] = SCRIPTED.prefill_hidden_states(PROMPTS[2] + tuple(altered))
    first, second, third = prove_all(checkpoint_works(REPLIES, rows, 100))
    prefill = SCRIPTED.prefill_hidden_states
    assert verify(first, REPLIES, prefill).status == "pass"
    verdict = verify(second, REPLIES, prefill)  # reply 3 [0, 80): prompt, 32, 48 rows
    assert verdict.status == "fail"
    assert verdict.reason.startswith("segment 1: chunks [2] exceed the thresholds (exp mismatches")
    assert [s.ok for s in verdict.segments] == [True, False]
    assert verify(third, REPLIES, prefill).reason.startswith("segment 0: chunks [0]")


def _kept(reply: int, **changes: object) -> list[ReplyTranscript]:
    return [replace(r, **changes) if i == reply else r for i, r in enumerate(REPLIES)]


@pytest.mark.parametrize(
    ("replies", "options", "reason"),
    [
        (REPLIES, {"host": OTHER}, f"signed by {HOST}, not by the host {OTHER}"),
        (REPLIES, {"model_id": keccak(b"other")}, "model_id 0x"),
        (_kept(0, prompt_ids=(*PROMPTS[0][:-1], 99)), {}, "segment 0: prompt_hash differs"),
        (
            _kept(0, reply_ids=(*OUTPUTS[0][:-1], 1)),
            {},
            "transcript_hash differs from the hash chain over the kept replies",
        ),
        (REPLIES[:1] + REPLIES[2:], {}, "the kept replies hold 70 of the 100 tokens in [0, 100)"),
    ],
    ids=["host", "model", "prompt", "transcript", "missing-reply"],
)
def test_checks_that_need_no_model(bundles, replies, options, reason):
    verdict = verify(bundles[0], replies, no_model, **options)
    assert verdict.status == "fail"
    assert verdict.reason.startswith(reason), verdict.reason


def test_an_unsigned_bundle_fails_when_the_host_is_known(bundles):
    unsigned = replace(bundles[0], host_signature=b"")
    assert verify(unsigned, REPLIES, no_model, host=HOST).reason == "the bundle is not signed"
    assert verify(unsigned, REPLIES, SCRIPTED.prefill_hidden_states).status == "pass"


def test_a_verifier_may_keep_only_the_replies_a_checkpoint_touches(bundles):
    verdict = verify(bundles[1], REPLIES[1:], SCRIPTED.prefill_hidden_states, host=HOST)
    assert verdict.status == "pass"  # no transcript hash to compare without the first reply
    with pytest.raises(ValueError, match="replies overlap at session token 60"):
        verify(bundles[1], [*REPLIES, replace(REPLIES[1], first_token=60)], no_model)


class Attesting(CommitmentProver):
    """Stands in for an external prover: an attestation, no activation proofs."""

    def prove(self, work: CheckpointWork) -> ProofBundle:
        return replace(super().prove(work), prover="external", attestation=b"\x01")


@pytest.mark.parametrize(
    ("prover", "reason"),
    [
        (CommitmentProver(), "a commitment carries no model proof to re-run"),
        (Attesting(), "the external attestation is checked by its own verifier, not here"),
        (
            CommitmentProver(unproven=True),
            "a commitment carries no model proof to re-run (a fallback after the host's prover "
            "failed)",
        ),
        (MockProver(), "mock proofs prove nothing"),
    ],
    ids=["commitment", "external", "fallback", "mock"],
)
def test_bundles_without_a_model_proof_are_unproven(prover, reason):
    bundle = prove_all(checkpoint_works(REPLIES, scripted_rows(REPLIES), 100)[:1], prover)[0]
    verdict = verify(bundle, REPLIES, no_model, host=HOST, model_id=MODEL_ID)
    assert (verdict.status, verdict.reason) == ("unproven", reason)
    assert verify(bundle, REPLIES, no_model, host=OTHER).status == "fail"


def test_activation_without_a_model_is_unproven(bundles):
    verdict = verify(bundles[0], REPLIES, None, host=HOST)
    assert verdict.status == "unproven" and "no model" in verdict.reason


# The real model ----------------------------------------------------------------------

STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
INTERVAL = 50


def generate(smollm, messages, max_tokens: int) -> tuple[list[int], list[int], np.ndarray]:
    """Prompt ids, output ids and the rows captured while decoding (what a node proves)."""
    ids, rows = [], []
    params = GenerationParams(max_tokens=max_tokens, temperature=0)
    for event in smollm.generate(messages, params, capture_hidden_states=True):
        if isinstance(event, Token):
            ids.append(event.token_id)
        elif isinstance(event, Hidden):
            assert event.start == sum(len(r) for r in rows)
            rows.append(event.rows)
    return smollm.tokenize_chat(messages), ids, np.concatenate(rows)


@pytest.fixture(scope="module")
def chat(smollm):
    """Two replies (40 + 30 tokens) with their captured rows; checkpoints every 50 tokens:
    [0, 50) = reply 1 + reply 2 [0, 10), then [50, 70) = reply 2 [10, 30)."""
    prompt_a, output_a, rows_a = generate(smollm, STORY, 40)
    follow_up = [
        *STORY,
        {"role": "assistant", "content": smollm.decode(output_a)},
        {"role": "user", "content": "Go on with the story."},
    ]
    prompt_b, output_b, rows_b = generate(smollm, follow_up, 30)
    assert (len(output_a), len(output_b)) == (40, 30)
    replies = transcript([prompt_a, prompt_b], [output_a, output_b])
    return replies, {0: rows_a, 40: rows_b}


def test_smollm_honest_checkpoints_pass(smollm, chat):
    replies, rows = chat
    bundles = prove_all(checkpoint_works(replies, rows, INTERVAL, "transformers"))
    assert [[(s.reply_start, s.reply_end) for s in b.segments] for b in bundles] == [
        [(0, 40), (0, 10)],
        [(10, 30)],
    ]
    for bundle in bundles:
        verdict = verify(bundle, replies, VerifierModel.of(smollm), host=HOST)
        assert verdict.status == "pass", verdict.reason
        assert verdict.profile == "fp32"
        assert sum(c.exact for c in verdict.sampling) == bundle.token_end - bundle.token_start


def test_smollm_a_token_the_host_did_not_compute_fails(smollm, chat):
    replies, rows = chat
    reply = replies[1]
    altered = list(reply.reply_ids)
    altered[20] ^= 1  # a neighbouring token id; reply 2 token 20 is in checkpoint 2
    cheated = {**rows, 40: smollm.prefill_hidden_states([*reply.prompt_ids, *altered])}
    first, second = prove_all(checkpoint_works(replies, cheated, INTERVAL, "transformers"))
    assert verify(first, replies, VerifierModel.of(smollm)).status == "pass"
    verdict = verify(second, replies, VerifierModel.of(smollm))
    assert verdict.status == "fail" and verdict.reason.startswith("segment 0: chunks [0]")


def test_smollm_a_different_prompt_fails(smollm, chat):
    replies, rows = chat
    reply = replies[0]
    prompt = list(reply.prompt_ids)
    prompt[-8] ^= 1  # inside the user's message; same length, so rows line up
    cheated = {**rows, 0: smollm.prefill_hidden_states([*prompt, *reply.reply_ids])}
    first, _ = prove_all(checkpoint_works(replies, cheated, INTERVAL, "transformers"))
    verdict = verify(first, replies, VerifierModel.of(smollm))
    assert verdict.status == "fail"
    assert not any(c.ok for c in verdict.segments[0].chunks)  # the prompt and both decodes
    assert verdict.segments[1].ok  # reply 2 was computed honestly


@contextmanager
def noisy_weights(smollm, relative: float) -> Iterator[None]:
    """Temporarily serve another model: noise on every MLP output projection."""
    weights = [layer.mlp.down_proj.weight for layer in smollm._model.model.layers]
    with perturbed(weights, relative, seed=0):
        yield


def test_smollm_a_different_model_fails(smollm, chat):
    replies, rows = chat
    bundles = prove_all(checkpoint_works(replies, rows, INTERVAL, "transformers"))
    with noisy_weights(smollm, 0.01):
        verdicts = [verify(b, replies, VerifierModel.of(smollm)) for b in bundles]
    assert [v.status for v in verdicts] == ["fail", "fail"]
    assert not any(c.ok for v in verdicts for s in v.segments for c in s.chunks)
    assert "mantissa error mean" in verdicts[0].reason
