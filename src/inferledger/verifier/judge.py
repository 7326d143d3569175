"""A juror's verdict on one disputed checkpoint: did the host sign something false?

Fraud is judged only on what the host committed to. The bundle's signature makes it the
host's word; its salted prompt hashes, transcript hash chain, sampling parameters and seed
commitment bind it to one transcript. So a juror first checks that the challenger's
revealed transcript is that one: if it is not (a forged prompt, another seed, tokens the
bundle does not commit to), the challenger has shown nothing about the host and the verdict
is *no fraud*. Only when the transcript matches every commitment does the juror re-run the
model under the profile the bundle names; activations or token choices outside it, or a
bundle that names another model than the session pays for, are fraud. A bundle with no model
proof to re-run, or none a profile covers, is not fraud: nothing was shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from eth_utils.address import to_checksum_address

from inferledger.proofs.bundle import ProofBundle
from inferledger.proofs.evidence import Transcript, reply_transcripts
from inferledger.proofs.verify import VerifierModel, verify_bundle

Stage = Literal["evidence", "claim", "model"]


@dataclass(frozen=True)
class DisputedCheckpoint:
    """What the chain says about a dispute: the session's facts and the two commitments."""

    dispute_id: int
    session_id: int
    chain_id: int
    marketplace: str
    host: str
    model_id: bytes
    checkpoint_index: int
    bundle_hash: bytes
    transcript_commitment: bytes


@dataclass(frozen=True)
class Judgement:
    """``stage`` says where the verdict was reached: ``evidence`` (the revealed bundle or
    transcript is not what the dispute committed to, or not this session's), ``claim`` (the
    bundle's own claims, before any model ran) or ``model`` (the re-run)."""

    fraud: bool
    stage: Stage
    reason: str
    details: dict[str, Any] | None = None


def judge(
    case: DisputedCheckpoint,
    bundle_bytes: bytes | None,
    transcript_bytes: bytes | None,
    model: Any,
) -> Judgement:
    """The verdict on ``case`` from the revealed bytes (None: never revealed) and the
    juror's backend ``model`` (its ``tokenize_chat``, ``prefill_hidden_states``, ``logits``)."""
    found = _evidence(case, bundle_bytes, transcript_bytes)
    if isinstance(found, Judgement):
        return found
    bundle, transcript = found
    if bundle.model_id != case.model_id:
        return Judgement(
            True,
            "claim",
            f"the host signed a proof for model 0x{bundle.model_id.hex()}, but the session "
            f"pays for 0x{case.model_id.hex()}",
        )
    replies = reply_transcripts(transcript.replies, model.tokenize_chat)
    try:
        verdict = verify_bundle(
            bundle, replies, VerifierModel.of(model), salt=transcript.salt_bytes, host=case.host
        )
    except ValueError as exc:  # replies that overlap cannot come from one session
        return Judgement(False, "evidence", f"the revealed transcript: {exc}")
    details = {"profile": verdict.profile, "status": verdict.status}
    if verdict.status == "fail" and verdict.segments:
        return Judgement(True, "model", verdict.reason, details)
    if verdict.status == "fail":
        return Judgement(
            False,
            "evidence",
            f"the revealed transcript does not match what the host signed: {verdict.reason}",
            details,
        )
    if verdict.status == "pass":
        return Judgement(False, "model", f"the host's proof holds: {verdict.reason}", details)
    return Judgement(False, "model", f"nothing shown against the host: {verdict.reason}", details)


def _evidence(
    case: DisputedCheckpoint, bundle_bytes: bytes | None, transcript_bytes: bytes | None
) -> tuple[ProofBundle, Transcript] | Judgement:
    """The revealed bundle and transcript if they are the dispute's; else the verdict."""

    def refused(reason: str) -> Judgement:
        return Judgement(False, "evidence", reason)

    if bundle_bytes is None or transcript_bytes is None:
        missing = "bundle" if bundle_bytes is None else "transcript"
        return refused(f"the challenger never revealed the {missing} to this juror")
    try:
        bundle = ProofBundle.decode(bundle_bytes)
    except ValueError as exc:
        return refused(f"the revealed bundle is not a proof bundle: {exc}")
    if bundle.signing_hash() != case.bundle_hash:
        return refused("the revealed bundle is not the one the dispute names")
    try:
        transcript = Transcript.decode(transcript_bytes, case.transcript_commitment)
    except ValueError as exc:
        return refused(f"the revealed transcript: {exc}")
    where = (bundle.session_id, bundle.chain_id, to_checksum_address(bundle.marketplace))
    wanted = (case.session_id, case.chain_id, to_checksum_address(case.marketplace))
    if where != wanted:
        return refused(f"the bundle is for session {where}, the dispute for {wanted}")
    if bundle.checkpoint_index != case.checkpoint_index:
        return refused(
            f"the bundle is checkpoint {bundle.checkpoint_index}, the dispute names "
            f"{case.checkpoint_index}"
        )
    told = (transcript.session_id, transcript.chain_id, to_checksum_address(transcript.marketplace))
    if told != wanted:
        return refused(f"the transcript is for session {told}, the dispute for {wanted}")
    return bundle, transcript
