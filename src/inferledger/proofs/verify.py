"""Check a proof bundle against the transcript the user kept, by re-running the model.

The user (or any verifier the user hands the transcript and the session salt to) holds each
reply's prompt and generated ids; the public bundle holds only salted hashes and masked
activation proofs, which nobody can check without the salt. :func:`verify_bundle`
maps the bundle's session token range onto those replies, checks everything that needs no
model (layout, prompt hashes, transcript hash, signer, model id, sampling parameters), then
re-runs one prefill per segment: its hidden states against the activation proofs, its logits
against every token's choice (``proofs.sampling``), under the profile the bundle's backend,
dtype and sampler call for (``proofs.profiles``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Any, Literal

import numpy as np
from eth_utils.address import to_checksum_address

from inferledger.proofs.activation import VerifyResult, segment_chunks, verify_chunk_proofs
from inferledger.proofs.bundle import (
    ProofBundle,
    Segment,
    mask_proof,
    prompt_hash,
    sealed_transcript,
)
from inferledger.proofs.profiles import Profile, profile_for
from inferledger.proofs.sampling import Sampling, SamplingCheck, check_sampling, seed_commitment
from inferledger.proofs.transcript import TranscriptHash

Prefill = Callable[[Sequence[int]], np.ndarray]
"""Final-norm hidden states of one prefill over the ids, one row per position."""
Logits = Callable[[np.ndarray], np.ndarray]
"""Next-token logits from final-norm hidden states, one row per row (the model's head)."""


@dataclass(frozen=True)
class VerifierModel:
    """The verifier's model: one prefill's hidden states, its head's logits (without them
    the sampling is not checked) and the dtype it computes in (which picks the profile)."""

    prefill: Prefill
    logits: Logits | None = None
    dtype: str = "float32"

    @classmethod
    def of(cls, backend: Any) -> VerifierModel:
        """From a backend: ``prefill_hidden_states``, ``logits`` when it has them, ``dtype``."""
        return cls(
            backend.prefill_hidden_states,
            getattr(backend, "logits", None),
            getattr(backend, "dtype", "float32"),
        )


Model = Prefill | VerifierModel
"""A prefill alone (activation proofs only) or the whole verifier model."""


def as_model(model: Model | None) -> VerifierModel | None:
    if model is None or isinstance(model, VerifierModel):
        return model
    return VerifierModel(model)


def sharing_prefills(model: VerifierModel, replies: Sequence[ReplyTranscript]) -> VerifierModel:
    """``model`` with one prefill per kept reply: a checkpoint's part of a reply is sliced
    from the prefill of the whole reply (with causal attention a prefix's rows do not depend
    on what follows), so the checkpoints of a reply share one prefill."""
    wholes = [(*reply.prompt_ids, *reply.reply_ids) for reply in replies]
    done: dict[tuple[int, ...], np.ndarray] = {}

    def prefill(token_ids: Sequence[int]) -> np.ndarray:
        ids = tuple(token_ids)
        for whole in wholes:
            if len(whole) >= len(ids) and whole[: len(ids)] == ids:
                if whole not in done:
                    done[whole] = np.asarray(model.prefill(whole))
                return done[whole][: len(ids)]
        return np.asarray(model.prefill(ids))

    return replace(model, prefill=prefill)


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
    sampling: Sampling | None = None
    """What the user asked for (and its seed); None when the record does not say."""

    @property
    def end_token(self) -> int:
        """The session token count after this reply."""
        return self.first_token + len(self.reply_ids)


@dataclass(frozen=True)
class BundleVerdict:
    """``unproven``: everything checkable passed but there was no model proof to re-run;
    ``unverifiable``: no profile covers the bundle's backend, dtype and sampler (or the
    verifier's dtype), so no verdict either way."""

    status: Literal["pass", "fail", "unproven", "unverifiable"]
    reason: str
    segments: tuple[VerifyResult, ...] = ()
    sampling: tuple[SamplingCheck, ...] = ()
    profile: str | None = None


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
    model: Model | None,
    *,
    salt: bytes,
    host: str | None = None,
    model_id: bytes | None = None,
    profile: Profile | None = None,
) -> BundleVerdict:
    """Verdict on ``bundle`` given the kept ``replies`` and the session's ``salt``
    (``SessionRecord.salt``); ``host``/``model_id`` when known.

    ``model`` is the verifier's (``VerifierModel.of(backend)``); without it an activation
    bundle is ``unproven``, and so is one whose sampling the profile checks when the model
    has no ``logits``. ``profile`` overrides the one the bundle's backend, dtype and sampler
    and the model's dtype call for. Overlapping ``replies`` are a ValueError: they cannot
    come from one session.
    """
    verifier = as_model(model)
    parts = reply_segments(replies, bundle.token_start, bundle.token_end)
    problem = (
        _check_claims(bundle, replies, salt, host, model_id)
        or _check_layout(bundle, parts, salt)
        or _check_sampling_claims(bundle, parts, salt)
    )
    if problem:
        return BundleVerdict("fail", problem)
    if bundle.prover != "activation":
        note = _NOT_RERUN[bundle.prover]
        if bundle.unproven:
            note += " (a fallback after the host's prover failed)"
        return BundleVerdict("unproven", note)
    dtype = verifier.dtype if verifier is not None else "float32"
    profile = profile or profile_for(bundle.backend, bundle.dtype, bundle.sampler, dtype)
    if profile is None:
        return BundleVerdict(
            "unverifiable",
            f"no profile for backend {bundle.backend!r}, dtype {bundle.dtype!r}, sampler "
            f"{bundle.sampler!r} checked in {dtype}: pick one with --profile",
        )
    if verifier is None:
        return BundleVerdict("unproven", "activation proofs not re-run: no model to prefill with")
    if profile.sampling is not None and verifier.logits is None:
        return BundleVerdict("unproven", "sampling not checked: no model head for logits")
    results: list[VerifyResult] = []
    checks: list[SamplingCheck] = []
    failure: tuple[int, str] | None = None
    for index, (reply, _, _) in enumerate(parts):
        segment = _unmasked(bundle, index, salt)
        activation, check = _verify_segment(segment, reply, verifier, profile)
        results.append(activation)
        if check is not None:
            checks.append(check)
        if failure is None and not activation.ok:
            failure = index, activation.reason or "activations differ"
        elif failure is None and check is not None and not check.ok:
            allowed = profile.sampling.max_mismatches if profile.sampling else 0
            failure = (
                index,
                (
                    f"{check.mismatches} of {check.positions} tokens are not what the model would "
                    f"choose (largest gap {check.worst_gap:.3f} logits; the {profile.name} profile "
                    f"allows {allowed})"
                ),
            )
    if failure is not None:
        return BundleVerdict(
            "fail",
            f"segment {failure[0]}: {failure[1]}",
            tuple(results),
            tuple(checks),
            profile.name,
        )
    chunks = sum(len(result.chunks) for result in results)
    sampled = "" if not checks else f", {sum(c.positions for c in checks)} token choices"
    reason = f"{len(results)} segments, {chunks} chunks{sampled} within the {profile.name} profile"
    return BundleVerdict("pass", reason, tuple(results), tuple(checks), profile.name)


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
    segment: Segment, reply: ReplyTranscript, model: VerifierModel, profile: Profile
) -> tuple[VerifyResult, SamplingCheck | None]:
    """One prefill: its states against the activation proofs, and (when the profile checks
    sampling) the logits of the rows that chose the segment's tokens against them."""
    reply_ids = reply.reply_ids[: segment.reply_end]
    ids = [*reply.prompt_ids, *reply_ids]
    states = np.asarray(model.prefill(ids))
    if states.ndim != 2 or states.shape[0] != len(ids):
        bad = VerifyResult(False, (), f"prefill gave shape {states.shape} for {len(ids)} tokens")
        return bad, None
    chunks = segment_chunks(segment.prompt_tokens, segment.reply_start, segment.reply_end)
    activation = verify_chunk_proofs(
        segment.activation_proofs, states, chunks, thresholds=profile.activation
    )
    if profile.sampling is None or model.logits is None or not activation.ok:
        return activation, None
    first = len(reply.prompt_ids) + segment.reply_start - 1  # the row that chose the first
    rows = np.asarray(model.logits(states[first : len(ids) - 1]))
    sampling = _sampling_of(segment, reply)
    check = check_sampling(
        rows,
        reply.prompt_ids,
        reply_ids,
        segment.reply_start,
        segment.reply_end,
        sampling,
        profile.sampling,
    )
    return activation, check


def _sampling_of(segment: Segment, reply: ReplyTranscript) -> Sampling:
    """The user's parameters and seed (``_check_sampling_claims`` made sure the segment
    says the same), or the segment's, with the default seed, when the record has none."""
    if reply.sampling is not None:
        return reply.sampling
    return Sampling(segment.temperature, segment.top_p, segment.repetition_penalty, None)


def _check_sampling_claims(
    bundle: ProofBundle, parts: list[tuple[ReplyTranscript, int, int]], salt: bytes
) -> str | None:
    """Each segment must name the parameters and (committed) seed the user asked for."""
    for index, (segment, (reply, _, _)) in enumerate(zip(bundle.segments, parts, strict=True)):
        asked = reply.sampling
        if asked is None:
            continue
        said = (segment.temperature, segment.top_p, segment.repetition_penalty)
        wanted = (asked.temperature, asked.top_p, asked.repetition_penalty)
        if said != wanted:
            return (
                f"segment {index}: sampled at temperature/top_p/repetition_penalty {said}, "
                f"the user asked for {wanted}"
            )
        if segment.seed_commitment != seed_commitment(asked.effective_seed, salt):
            return f"segment {index}: the seed commitment is not the user's seed"
    return None


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
