"""Re-check a finished (or running) session's checkpoints from the user's side.

Each receipt the session signer signed commits to a ``proof_hash``, the keccak256 of the
checkpoint's proof bundle, which the host serves at ``{node}/v1/proofs/0x<proof_hash>``.
:func:`fetch_bundles` downloads the bundles and checks each against its receipt;
:func:`verify_session` rebuilds each reply's transcript from the local record (prompt ids =
``tokenize(messages)``, the reply's token ids, its first session token) and checks every
bundle with :func:`inferledger.proofs.verify.verify_bundle`, re-running the prefill.

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

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urljoin, urlsplit

import httpx
from eth_utils import keccak

from inferledger.proofs.bundle import ProofBundle
from inferledger.proofs.verify import Prefill, ReplyTranscript, verify_bundle
from inferledger.sdk.errors import SdkError
from inferledger.sdk.records import ReceiptRecord, SessionRecord
from inferledger.sdk.wire import http_base

Tokenize = Callable[[Sequence[dict[str, str]]], Sequence[int]]
"""Chat messages -> prompt token ids, exactly as the node's backend renders them
(``backend.tokenize_chat``)."""

VerdictStatus = Literal["pass", "fail", "unproven"]
FETCH_TIMEOUT = 10.0


class BundleUnavailable(SdkError):
    """A checkpoint's proof bundle could not be fetched, or is not the receipted one."""

    def __init__(self, checkpoint: Checkpoint, problem: str) -> None:
        super().__init__(f"checkpoint {checkpoint.index} ({checkpoint.url}): {problem}")
        self.checkpoint = checkpoint
        self.problem = problem


@dataclass(frozen=True)
class Checkpoint:
    """One receipted checkpoint of a session: session tokens ``[token_start, token_end)``."""

    index: int
    """1-based, in token order (the bundle's ``checkpoint_index``)."""
    token_start: int
    token_end: int
    proof_hash: bytes
    url: str
    """Where the host serves the bundle."""

    @property
    def proof_hash_hex(self) -> str:
        return "0x" + self.proof_hash.hex()


@dataclass(frozen=True)
class CheckpointVerdict:
    """What re-checking one checkpoint found.

    ``status``: ``pass`` (every check and the prefill agree), ``fail`` (something does
    not match, or the bundle is missing) or ``unproven`` (everything checkable passed but
    the bundle carries no model proof to re-run, e.g. a commitment).
    """

    checkpoint: int
    token_start: int
    token_end: int
    proof_hash: str
    status: VerdictStatus
    reason: str
    prover: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "pass"


def checkpoints(record: SessionRecord) -> list[Checkpoint]:
    """The record's receipted checkpoints in token order (a receipt signed twice for the
    same count, e.g. after a reconnect, counts once: the last signature wins)."""
    latest: dict[int, ReceiptRecord] = {}
    for receipt in record.receipts:
        latest[receipt.tokens] = receipt
    result = []
    start = 0
    for index, tokens in enumerate(sorted(latest), start=1):
        receipt = latest[tokens]
        proof_hash = _hash_bytes(receipt.proof_hash)
        result.append(Checkpoint(index, start, tokens, proof_hash, bundle_url(record, receipt)))
        start = tokens
    return result


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
    """Every checkpoint's bundle, in order; raises :class:`BundleUnavailable` on the first
    that cannot be fetched or does not hash to its receipt (use :func:`fetch_bundle` per
    checkpoint to carry on past failures)."""
    with httpx.Client() as http:
        return [fetch_bundle(cp, timeout=timeout, http=http) for cp in checkpoints(record)]


def transcripts(record: SessionRecord, tokenize: Tokenize) -> list[ReplyTranscript]:
    """The replies the record kept, as the verifier sees them (empty replies left out)."""
    return [
        ReplyTranscript(
            prompt_ids=tuple(int(t) for t in tokenize(reply.messages)),
            reply_ids=tuple(reply.token_ids),
            first_token=reply.first_token,
        )
        for reply in record.replies
        if reply.token_ids
    ]


def verify_checkpoint(
    record: SessionRecord,
    checkpoint: Checkpoint,
    bundle: ProofBundle,
    prefill: Prefill | None,
    replies: Sequence[ReplyTranscript],
) -> CheckpointVerdict:
    """Check one bundle against its receipt, the session and the kept ``replies``."""

    def verdict(status: VerdictStatus, reason: str) -> CheckpointVerdict:
        return CheckpointVerdict(
            checkpoint.index,
            checkpoint.token_start,
            checkpoint.token_end,
            checkpoint.proof_hash_hex,
            status,
            reason,
            bundle.prover,
        )

    problem = _session_mismatch(record, checkpoint, bundle)
    if problem:
        return verdict("fail", problem)
    try:
        result = verify_bundle(
            bundle,
            replies,
            prefill,
            host=record.host,
            model_id=_hash_bytes(record.model_id),
        )
    except ValueError as exc:
        return verdict("fail", str(exc))
    return verdict(result.status, result.reason)


def verify_session(
    record: SessionRecord,
    bundles: Sequence[ProofBundle],
    prefill: Prefill | None,
    tokenize: Tokenize,
) -> Iterator[CheckpointVerdict]:
    """Yield one verdict per receipted checkpoint, in order, as each is checked.

    ``bundles`` are matched to the receipts by proof hash (as :func:`fetch_bundles`
    returns them, or any subset); a checkpoint without its bundle fails. ``prefill`` runs
    the verifier's model (``backend.prefill_hidden_states``); None leaves activation
    proofs ``unproven``. ``tokenize`` must render prompts as the host's backend did.
    """
    by_hash = {bundle.proof_hash(): bundle for bundle in bundles}
    replies = transcripts(record, tokenize)
    for checkpoint in checkpoints(record):
        bundle = by_hash.get(checkpoint.proof_hash)
        if bundle is None:
            yield CheckpointVerdict(
                checkpoint.index,
                checkpoint.token_start,
                checkpoint.token_end,
                checkpoint.proof_hash_hex,
                "fail",
                "no proof bundle for this receipt",
            )
            continue
        yield verify_checkpoint(record, checkpoint, bundle, prefill, replies)


def _session_mismatch(
    record: SessionRecord, checkpoint: Checkpoint, bundle: ProofBundle
) -> str | None:
    """The bundle must be for this session's checkpoint, at the range the receipts give."""
    if bundle.session_id != record.session_id:
        return f"the bundle is for session {bundle.session_id}, not {record.session_id}"
    if bundle.chain_id != record.chain_id:
        return f"the bundle is for chain id {bundle.chain_id}, not {record.chain_id}"
    if bundle.marketplace.lower() != record.marketplace.lower():
        return f"the bundle is for marketplace {bundle.marketplace}, not {record.marketplace}"
    if (bundle.token_start, bundle.token_end) != (checkpoint.token_start, checkpoint.token_end):
        return (
            f"the bundle covers tokens [{bundle.token_start}, {bundle.token_end}), the "
            f"receipts give [{checkpoint.token_start}, {checkpoint.token_end})"
        )
    return None


def _hash_bytes(text: str) -> bytes:
    return bytes.fromhex(text[2:] if text.startswith("0x") else text)


def _short(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
