"""Re-check a finished (or running) session's checkpoints from the user's side.

Each receipt the session signer signed commits to a ``proof_hash``: the keccak256 of the
newest proof bundle when the node asked for the receipt, which the host serves at
``{node}/v1/proofs/0x<proof_hash>``, or 32 zero bytes for a receipt signed before the
session's first bundle (docs/protocol.md, "What a receipt signs"). Several receipts may
name one bundle (the node asks for receipts between bundles), so a *checkpoint* here is
one distinct bundle the receipts name, checked once; receipts naming no bundle have
nothing to fetch and are no failure (:func:`unnamed_receipts` counts them).

:func:`fetch_bundles` downloads the bundles and checks each hashes to its receipts'
proof hash; :func:`verify_session` rebuilds each reply's transcript from the local record
(prompt ids = ``tokenize(messages)``, the reply's token ids, its first session token),
checks that each bundle sits where the receipts put it, and checks every bundle with
:func:`inferledger.proofs.verify.verify_bundle`, re-running the prefill.

```python
from inferledger.sdk.verification import fetch_bundles, verify_session

bundles = fetch_bundles(session.record)
for verdict in verify_session(
    session.record, bundles, backend.prefill_hidden_states, backend.tokenize_chat
):
    print(verdict.checkpoint, verdict.status, verdict.reason)
```

No rich, no typer: the CLI (``inferledger verify``) and the demo both build on this.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal
from urllib.parse import urljoin, urlsplit

import httpx
from eth_utils.crypto import keccak

from inferledger.proofs.bundle import ProofBundle
from inferledger.proofs.evidence import Tokenize, reply_transcripts
from inferledger.proofs.profiles import Profile
from inferledger.proofs.verify import (
    BundleVerdict,
    Model,
    ReplyTranscript,
    as_model,
    sharing_prefills,
    verify_bundle,
)
from inferledger.sdk.errors import SdkError
from inferledger.sdk.records import ReceiptRecord, SessionRecord
from inferledger.sdk.wire import http_base

VerdictStatus = Literal["pass", "fail", "unproven", "unverifiable"]
FETCH_TIMEOUT = 10.0


class BundleUnavailable(SdkError):
    """A checkpoint's proof bundle could not be fetched, or is not the receipted one."""

    def __init__(self, checkpoint: Checkpoint, problem: str) -> None:
        super().__init__(f"checkpoint {checkpoint.index} ({checkpoint.url}): {problem}")
        self.checkpoint = checkpoint
        self.problem = problem


@dataclass(frozen=True)
class Checkpoint:
    """One proof bundle the session's receipts name (each distinct bundle once).

    The receipts bound where it ends: no earlier than ``ends_from``, the output tokens of
    the receipts signed before any named it (the node had served that many when it built
    the bundle), and no later than ``ends_by``, the output tokens of the first receipt
    naming it (a bundle only covers tokens served before the receipt was asked for).
    """

    index: int
    """1-based, in the order the receipts first name the bundles."""
    proof_hash: bytes
    url: str
    """Where the host serves the bundle."""
    ends_from: int
    ends_by: int

    @property
    def proof_hash_hex(self) -> str:
        return "0x" + self.proof_hash.hex()


@dataclass(frozen=True)
class CheckpointVerdict:
    """What re-checking one checkpoint found.

    ``status``: ``pass`` (every check and the prefill agree), ``fail`` (something does
    not match, or the bundle is missing) or ``unproven`` (everything checkable passed but
    the bundle carries no model proof to re-run, e.g. a commitment). ``token_start`` and
    ``token_end`` are the session output tokens the bundle covers; ``token_start`` is None
    when there is no bundle to say (``token_end`` is then the receipts' ``ends_by``).
    """

    checkpoint: int
    token_start: int | None
    token_end: int
    proof_hash: str
    status: VerdictStatus
    reason: str
    prover: str | None = None
    evidence: dict[str, Any] | None = None
    """What the re-run measured, for a dispute: the profile, every chunk's activation
    errors and every segment's sampling scores (None when nothing was re-run)."""

    @property
    def ok(self) -> bool:
        return self.status == "pass"

    @property
    def tokens(self) -> str:
        """The range for display, e.g. ``0-100`` (``?-100`` without a bundle)."""
        start = "?" if self.token_start is None else str(self.token_start)
        return f"{start}-{self.token_end}"


def _in_order(record: SessionRecord) -> list[ReceiptRecord]:
    """The record's receipts by their counts, keeping signing order for equal counts."""
    return sorted(record.receipts, key=lambda r: (r.tokens, r.input_tokens))


def _names_a_bundle(receipt: ReceiptRecord) -> bool:
    return any(_hash_bytes(receipt.proof_hash))


def checkpoints(record: SessionRecord) -> list[Checkpoint]:
    """The distinct proof bundles the record's receipts name, in the order they are first
    named; receipts naming the zero hash (before the session's first bundle) add none."""
    result: list[Checkpoint] = []
    seen: set[bytes] = set()
    receipted = 0  # output tokens of the receipts so far
    for receipt in _in_order(record):
        proof_hash = _hash_bytes(receipt.proof_hash)
        if _names_a_bundle(receipt) and proof_hash not in seen:
            seen.add(proof_hash)
            url = bundle_url(record, receipt)
            result.append(Checkpoint(len(result) + 1, proof_hash, url, receipted, receipt.tokens))
        receipted = max(receipted, receipt.tokens)
    return result


def unnamed_receipts(record: SessionRecord) -> int:
    """How many receipts name no bundle (signed before the session's first one): they
    have nothing to verify, and the bundles built later cover their tokens."""
    return sum(not _names_a_bundle(receipt) for receipt in record.receipts)


def bundle_url(record: SessionRecord, receipt: ReceiptRecord) -> str:
    """The URL of a receipt's bundle: its ``proof_uri`` resolved against the node's HTTP
    base, or the standard ``/v1/proofs/0x<proof_hash>`` path when it has none."""
    base = http_base(record.node_url).rstrip("/") + "/"
    uri = receipt.proof_uri or f"/v1/proofs/{receipt.proof_hash.lower()}"
    if urlsplit(uri).scheme in ("http", "https"):
        return uri
    return urljoin(base, uri.lstrip("/"))


def fetch_bundle(
    checkpoint: Checkpoint, *, timeout: float = FETCH_TIMEOUT, http: httpx.Client | None = None
) -> ProofBundle:
    """Download one checkpoint's bundle; its bytes must hash to the receipted proof_hash.

    Raises :class:`BundleUnavailable` when the node does not serve it, serves other bytes,
    or the bytes are not a canonical bundle.
    """
    try:
        if http is None:
            response = httpx.get(checkpoint.url, timeout=timeout)
        else:
            response = http.get(checkpoint.url, timeout=timeout)
    except httpx.HTTPError as exc:
        raise BundleUnavailable(
            checkpoint, f"cannot fetch the proof bundle ({exc.__class__.__name__}: {exc})"
        ) from exc
    if response.status_code != 200:
        raise BundleUnavailable(
            checkpoint,
            f"the node answered HTTP {response.status_code}: {_short(response.text)}",
        )
    data = response.content
    if keccak(data) != checkpoint.proof_hash:
        raise BundleUnavailable(
            checkpoint,
            f"the served bytes hash to 0x{keccak(data).hex()}, not the receipted proof_hash "
            f"{checkpoint.proof_hash_hex}",
        )
    try:
        return ProofBundle.decode(data)
    except ValueError as exc:
        raise BundleUnavailable(checkpoint, f"not a valid proof bundle: {exc}") from exc


def fetch_bundles(record: SessionRecord, *, timeout: float = FETCH_TIMEOUT) -> list[ProofBundle]:
    """Every named bundle once, in checkpoint order (none for receipts naming the zero
    hash); raises :class:`BundleUnavailable` on the first that cannot be fetched or does
    not hash to its receipts (use :func:`fetch_bundle` per checkpoint to carry on past
    failures)."""
    with httpx.Client() as http:
        return [fetch_bundle(cp, timeout=timeout, http=http) for cp in checkpoints(record)]


def transcripts(record: SessionRecord, tokenize: Tokenize) -> list[ReplyTranscript]:
    """The replies the record kept, as the verifier sees them (empty replies left out)."""
    return reply_transcripts(record.replies, tokenize)


def verify_checkpoint(
    record: SessionRecord,
    checkpoint: Checkpoint,
    bundle: ProofBundle,
    model: Model | None,
    replies: Sequence[ReplyTranscript],
    *,
    after: int = 0,
    profile: Profile | None = None,
) -> CheckpointVerdict:
    """Check one bundle against its receipts, the session and the kept ``replies``.

    ``after``: where the previous checkpoint's bundle ends (0 for the first): bundles are
    built in token order, so this one starts no earlier.
    """

    def verdict(
        status: VerdictStatus, reason: str, evidence: dict[str, Any] | None = None
    ) -> CheckpointVerdict:
        return CheckpointVerdict(
            checkpoint.index,
            bundle.token_start,
            bundle.token_end,
            checkpoint.proof_hash_hex,
            status,
            reason,
            bundle.prover,
            evidence,
        )

    problem = _session_mismatch(record, checkpoint, bundle, after)
    if problem:
        return verdict("fail", problem)
    try:
        result = verify_bundle(
            bundle,
            replies,
            model,
            salt=record.salt,
            host=record.host,
            model_id=_hash_bytes(record.model_id),
            profile=profile,
        )
    except ValueError as exc:
        return verdict("fail", str(exc))
    return verdict(result.status, result.reason, _evidence(result))


def _evidence(result: BundleVerdict) -> dict[str, Any] | None:
    if not result.segments:
        return None
    return {
        "profile": result.profile,
        "activation": [[asdict(chunk) for chunk in s.chunks] for s in result.segments],
        "sampling": [asdict(check) for check in result.sampling],
    }


def missing_bundle(checkpoint: Checkpoint, reason: str) -> CheckpointVerdict:
    """The verdict on a checkpoint whose bundle could not be had: a failure."""
    return CheckpointVerdict(
        checkpoint.index, None, checkpoint.ends_by, checkpoint.proof_hash_hex, "fail", reason
    )


def next_after(after: int, checkpoint: Checkpoint, bundle: ProofBundle | None) -> int:
    """Where the next bundle may start: this bundle's end, or without it the least the
    receipts allow."""
    return max(after, bundle.token_end if bundle is not None else checkpoint.ends_from)


def verify_session(
    record: SessionRecord,
    bundles: Sequence[ProofBundle],
    model: Model | None,
    tokenize: Tokenize,
) -> Iterator[CheckpointVerdict]:
    """Yield one verdict per checkpoint (each named bundle once), in order, as each is
    checked; receipts naming no bundle are skipped (see :func:`unnamed_receipts`).

    ``bundles`` are matched to the receipts by proof hash (as :func:`fetch_bundles`
    returns them, or any subset); a checkpoint without its bundle fails. ``model`` is the
    verifier's (``proofs.verify.VerifierModel.of(backend)``; a bare prefill checks only the
    activations); None leaves activation proofs ``unproven``. ``tokenize`` must render
    prompts as the host's backend did.
    """
    by_hash = {bundle.proof_hash(): bundle for bundle in bundles}
    replies = transcripts(record, tokenize)
    verifier = as_model(model)
    model = None if verifier is None else sharing_prefills(verifier, replies)
    after = 0
    for checkpoint in checkpoints(record):
        bundle = by_hash.get(checkpoint.proof_hash)
        if bundle is None:
            yield missing_bundle(checkpoint, "no proof bundle for this receipt")
        else:
            yield verify_checkpoint(record, checkpoint, bundle, model, replies, after=after)
        after = next_after(after, checkpoint, bundle)


def _session_mismatch(
    record: SessionRecord, checkpoint: Checkpoint, bundle: ProofBundle, after: int
) -> str | None:
    """The bundle must be for this session, and sit where the receipts naming it say."""
    if bundle.session_id != record.session_id:
        return f"the bundle is for session {bundle.session_id}, not {record.session_id}"
    if bundle.chain_id != record.chain_id:
        return f"the bundle is for chain id {bundle.chain_id}, not {record.chain_id}"
    if bundle.marketplace.lower() != record.marketplace.lower():
        return f"the bundle is for marketplace {bundle.marketplace}, not {record.marketplace}"
    if not checkpoint.ends_from <= bundle.token_end <= checkpoint.ends_by:
        return (
            f"the bundle ends at token {bundle.token_end}, but the receipts naming it put its "
            f"end between {checkpoint.ends_from} and {checkpoint.ends_by}"
        )
    if not after <= bundle.token_start < bundle.token_end:
        return (
            f"the bundle covers tokens [{bundle.token_start}, {bundle.token_end}), which "
            f"overlaps the previous bundle's (it ends at {after})"
            if bundle.token_start < after
            else f"the bundle covers no tokens ([{bundle.token_start}, {bundle.token_end}))"
        )
    return None


def _hash_bytes(text: str) -> bytes:
    return bytes.fromhex(text[2:] if text.startswith("0x") else text)


def _short(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
