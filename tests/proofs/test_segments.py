"""Segment chunk layout, and proofs built and checked over explicit chunk lists."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from inferledger.inference import load_backend
from inferledger.proofs.activation import (
    DECODE_BATCH,
    PROOF_BYTES,
    SAME_BACKEND,
    build_chunk_proofs,
    segment_chunks,
    verify_chunk_proofs,
)

PROMPT = list(range(1, 21))  # 20 prompt tokens
REPLY = [256 + (7 * i) % 20 for i in range(100)]


@pytest.fixture(scope="module")
def states() -> np.ndarray:
    """Scripted pseudo-states (causal: row i depends on ids[: i + 1]) for prompt + reply."""
    backend = load_backend("scripted", tokens_per_second=0, hidden_size=128)
    return backend.prefill_hidden_states(PROMPT + REPLY)


@pytest.mark.parametrize(
    ("reply_start", "reply_end", "expected"),
    [
        (0, 5, [(0, 10), (10, 15)]),
        (0, 32, [(0, 10), (10, 42)]),
        (0, 63, [(0, 10), (10, 73)]),  # the remainder joins the last chunk
        (0, 64, [(0, 10), (10, 42), (42, 74)]),
        (0, 100, [(0, 10), (10, 42), (42, 74), (74, 110)]),
        (100, 200, [(110, 142), (142, 174), (174, 210)]),  # mid-reply: no prompt chunk
        (100, 101, [(110, 111)]),
    ],
)
def test_segment_chunks(reply_start: int, reply_end: int, expected: list[tuple[int, int]]):
    chunks = segment_chunks(10, reply_start, reply_end)
    assert [(c.start, c.stop) for c in chunks] == expected


def test_decode_chunks_tile_the_segment_within_the_byte_budget():
    for reply_start in (0, 7, 100):
        for n in range(1, 300):
            chunks = segment_chunks(3, reply_start, reply_start + n)
            decode = chunks[1:] if reply_start == 0 else chunks
            assert decode[0].start == 3 + reply_start and decode[-1].stop == 3 + reply_start + n
            assert all(a.stop == b.start for a, b in pairwise(decode))
            assert all(len(c) == DECODE_BATCH for c in decode[:-1])
            if n >= DECODE_BATCH:
                assert DECODE_BATCH <= len(decode[-1]) < 2 * DECODE_BATCH
                assert len(decode) * PROOF_BYTES / n <= PROOF_BYTES / DECODE_BATCH
            else:
                assert len(decode) == 1


@pytest.mark.parametrize(("args"), [(0, 0, 5), (10, 5, 5), (10, -1, 3), (10, 0, 5, 0)])
def test_segment_chunks_rejects_bad_arguments(args: tuple[int, ...]):
    with pytest.raises(ValueError):
        segment_chunks(*args)


def test_proofs_from_the_unproved_rows_only_equal_proofs_from_a_full_prefill(states):
    chunks = segment_chunks(len(PROMPT), 40, 100)
    first = len(PROMPT) + 40
    tail = build_chunk_proofs(states[first:], first, chunks)
    assert tail == build_chunk_proofs(states, 0, chunks)
    assert len(tail) == 1 and all(len(p) == PROOF_BYTES for p in tail)  # 60 tokens: one chunk
    result = verify_chunk_proofs(tail, states, chunks, thresholds=SAME_BACKEND)
    assert result.ok and result.reason is None
    assert all(c.exp_mismatches == 0 and c.mant_err_mean == 0 for c in result.chunks)


def test_a_changed_token_fails_from_its_chunk_on(states):
    chunks = segment_chunks(len(PROMPT), 0, 100)  # prompt, then rows 20-52, 52-84, 84-120
    proofs = build_chunk_proofs(states, 0, chunks)
    altered = list(REPLY)
    altered[40] ^= 1  # row 20 + 40 = 60 onwards differs: chunks 2 and 3
    backend = load_backend("scripted", tokens_per_second=0, hidden_size=128)
    verifier = backend.prefill_hidden_states(PROMPT + altered)
    result = verify_chunk_proofs(proofs, verifier, chunks, thresholds=SAME_BACKEND)
    assert [c.ok for c in result.chunks] == [True, True, False, False]
    assert result.reason is not None
    assert result.reason.startswith("chunks [2, 3] exceed the thresholds (exp mismatches ")
    assert "> 4" in result.reason


def test_wrong_proof_lists_and_rows_outside_the_chunks(states):
    chunks = segment_chunks(len(PROMPT), 0, 40)
    proofs = build_chunk_proofs(states, 0, chunks)
    assert verify_chunk_proofs(proofs[:1], states, chunks).reason == "expected 2 proofs, got 1"
    assert not verify_chunk_proofs([proofs[0], proofs[1][:-2]], states, chunks).ok
    with pytest.raises(ValueError, match="not within the rows' positions"):
        build_chunk_proofs(states[30:], 30, chunks)  # the prompt rows were not kept
    with pytest.raises(ValueError, match="not within"):
        verify_chunk_proofs(proofs, states[:50], chunks)  # the prefill is too short
