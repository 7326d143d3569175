"""Check a proof bundle against the transcript the user kept, by re-running the model.

The user (or any verifier the user hands the transcript and the session salt to) holds each
reply's prompt and generated ids; the public bundle holds only salted hashes and masked
activation proofs, which nobody can check without the salt. :func:`verify_bundle`
maps the bundle's session token range onto those replies, checks everything that needs no
model (layout, prompt hashes, transcript hash, signer, model id), then re-runs one prefill per
segment and compares it with the activation proofs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Literal

import numpy as np
from eth_utils.address import to_checksum_address

from inferledger.proofs.activation import (
    SAME_BACKEND,
    Thresholds,
    VerifyResult,
    segment_chunks,
    verify_chunk_proofs,
)
from inferledger.proofs.bundle import (
    ProofBundle,
    Segment,
    mask_proof,
    prompt_hash,
    sealed_transcript,
)
from inferledger.proofs.transcript import TranscriptHash

Prefill = Callable[[Sequence[int]], np.ndarray]
"""Final-norm hidden states of one prefill over the ids, one row per position."""

_NOT_RERUN = {
    "commitment": "a commitment carries no model proof to re-run",
    "external": "the external attestation is checked by its own verifier, not here",
    "mock": "mock proofs prove nothing",
}


@dataclass(frozen=True)
class ReplyTranscript:
    """What the user kept for one reply; ``first_token`` is the session count before it."""

    prompt_ids: tuple[int, ...]
    reply_ids: tuple[int, ...]
    first_token: int

    @property
    def end_token(self) -> int:
        """The session token count after this reply."""
        return self.first_token + len(self.reply_ids)


@dataclass(frozen=True)
class BundleVerdict:
    """``unproven``: everything checkable passed but there was no model proof to re-run."""

    status: Literal["pass", "fail", "unproven"]
    reason: str
    segments: tuple[VerifyResult, ...] = ()


def reply_segments(
    replies: Sequence[ReplyTranscript], token_start: int, token_end: int
) -> list[tuple[ReplyTranscript, int, int]]:
    """``(reply, reply_start, reply_end)`` for each reply the session range touches, in order."""
    ordered = sorted(replies, key=lambda reply: reply.first_token)
    for before, after in pairwise(ordered):
        if after.first_token < before.end_token:
            raise ValueError(f"replies overlap at session token {after.first_token}")
    parts = []
    for reply in ordered:
        start, end = max(token_start, reply.first_token), min(token_end, reply.end_token)
        if start < end:
            parts.append((reply, start - reply.first_token, end - reply.first_token))
    return parts


def verify_bundle(
    bundle: ProofBundle,
    replies: Sequence[ReplyTranscript],
    prefill: Prefill | None,
    *,
    salt: bytes,
    host: str | None = None,
    model_id: bytes | None = None,
    thresholds: Thresholds = SAME_BACKEND,
) -> BundleVerdict:
    """Verdict on ``bundle`` given the kept ``replies`` and the session's ``salt``
    (``SessionRecord.salt``); ``host``/``model_id`` when known.

    ``prefill`` runs the verifier's model (e.g. ``backend.prefill_hidden_states``); without
    it an activation bundle is ``unproven``. The default thresholds suit a verifier running
    the same float32 model code; pass ``CROSS_BACKEND`` for other hardware or engines.
    Overlapping ``replies`` are a ValueError: they cannot come from one session.
    """
    parts = reply_segments(replies, bundle.token_start, bundle.token_end)
    problem = _check_claims(bundle, replies, salt, host, model_id) or _check_layout(
        bundle, parts, salt
    )
    if problem:
        return BundleVerdict("fail", problem)
    if bundle.prover != "activation":
        note = _NOT_RERUN[bundle.prover]
        if bundle.unproven:
            note += " (a fallback after the host's prover failed)"
        return BundleVerdict("unproven", note)
    if prefill is None:
        return BundleVerdict("unproven", "activation proofs not re-run: no model to prefill with")
    results = tuple(
        _verify_segment(_unmasked(bundle, index, salt), reply, prefill, thresholds)
        for index, (reply, _, _) in enumerate(parts)
    )
    failed = [i for i, result in enumerate(results) if not result.ok]
    if failed:
        return BundleVerdict("fail", f"segment {failed[0]}: {results[failed[0]].reason}", results)
    chunks = sum(len(result.chunks) for result in results)
    reason = f"{len(results)} segments, {chunks} chunks within the thresholds"
    return BundleVerdict("pass", reason, results)


def _check_claims(
    bundle: ProofBundle,
    replies: Sequence[ReplyTranscript],
    salt: bytes,
    host: str | None,
    model_id: bytes | None,
) -> str | None:
    """Signer, model and transcript hash: what the host attests beyond the segments."""
    if host is not None:
        if not bundle.host_signature:
            return "the bundle is not signed"
        signer = bundle.host_signer()
        if signer != to_checksum_address(host):
            return f"signed by {signer}, not by the host {to_checksum_address(host)}"
    if model_id is not None and bundle.model_id != model_id:
        return f"model_id 0x{bundle.model_id.hex()} is not the session's 0x{model_id.hex()}"
    expected = _transcript_hash(bundle.session_id, replies, bundle.token_end)
    if expected is not None and sealed_transcript(expected, salt) != bundle.transcript_hash:
        return "transcript_hash differs from the hash chain over the kept replies"
    return None


def _check_layout(
    bundle: ProofBundle, parts: list[tuple[ReplyTranscript, int, int]], salt: bytes
) -> str | None:
    """The bundle's segments must be exactly the kept replies' parts, with their prompts."""
    wanted = bundle.token_end - bundle.token_start
    covered = sum(end - start for _, start, end in parts)
    if covered != wanted:
        span = f"[{bundle.token_start}, {bundle.token_end})"
        return f"the kept replies hold {covered} of the {wanted} tokens in {span}"
    if len(parts) != len(bundle.segments):
        return f"the bundle has {len(bundle.segments)} segments, the kept replies give {len(parts)}"
    for index, (segment, (reply, start, end)) in enumerate(
        zip(bundle.segments, parts, strict=True)
    ):
        if (segment.reply_start, segment.reply_end) != (start, end):
            return (
                f"segment {index}: covers reply tokens [{segment.reply_start}, "
                f"{segment.reply_end}), the kept replies give [{start}, {end})"
            )
        prompt = (len(reply.prompt_ids), prompt_hash(reply.prompt_ids, salt))
        if (segment.prompt_tokens, segment.prompt_hash) != prompt:
            return f"segment {index}: prompt_hash differs from the kept prompt"
    return None


def _unmasked(bundle: ProofBundle, index: int, salt: bytes) -> Segment:
    """Segment ``index`` with its activation proofs as the host's prover made them."""
    segment = bundle.segments[index]
    proofs = tuple(
        mask_proof(proof, salt, bundle.checkpoint_index, index, chunk)
        for chunk, proof in enumerate(segment.activation_proofs)
    )
    return replace(segment, activation_proofs=proofs)


def _verify_segment(
    segment: Segment, reply: ReplyTranscript, prefill: Prefill, thresholds: Thresholds
) -> VerifyResult:
    ids = [*reply.prompt_ids, *reply.reply_ids[: segment.reply_end]]
    states = np.asarray(prefill(ids))
    if states.ndim != 2 or states.shape[0] != len(ids):
        return VerifyResult(False, (), f"prefill gave shape {states.shape} for {len(ids)} tokens")
    chunks = segment_chunks(segment.prompt_tokens, segment.reply_start, segment.reply_end)
    return verify_chunk_proofs(segment.activation_proofs, states, chunks, thresholds=thresholds)


def _transcript_hash(
    session_id: int, replies: Sequence[ReplyTranscript], token_end: int
) -> bytes | None:
    """The session's hash chain after ``token_end``, when the replies hold every token before
    it (a user may keep only some replies; then there is nothing to compare)."""
    chain = TranscriptHash(session_id)
    position = 0
    for reply in sorted(replies, key=lambda reply: reply.first_token):
        if position == token_end:
            break
        if reply.first_token != position:
            return None
        for token in reply.reply_ids[: token_end - position]:
            chain.update(token)
        position = min(reply.end_token, token_end)
    return chain.value if position == token_end else None
