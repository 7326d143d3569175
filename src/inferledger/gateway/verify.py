"""Background re-verification of a share of the checkpoints the gateway paid for.

After each reply, the session's new checkpoints (proof bundles its receipts name) are
sampled at ``share``; each sampled one is fetched from the host and re-run by prefill
with the local model (:mod:`inferledger.sdk.verification`), in a worker thread so no
request waits. A failure is a warning in the log, a count in ``/metrics`` and an entry
in ``/v1/inferledger/sessions``, so the user can stop using the host; with
``gateway_auto_dispute`` on it is also disputed once the session settles
(``gateway/disputes.py``).
"""

from __future__ import annotations

import logging
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from inferledger.proofs.evidence import Tokenize
from inferledger.proofs.verify import Model
from inferledger.sdk.records import SessionRecord
from inferledger.sdk.verification import (
    BundleUnavailable,
    CheckpointVerdict,
    checkpoints,
    fetch_bundle,
    missing_bundle,
    next_after,
    transcripts,
    verify_checkpoint,
)

log = logging.getLogger("inferledger.gateway")


@dataclass(frozen=True)
class Checked:
    """One verified checkpoint, as ``/v1/inferledger/sessions`` lists it."""

    session_id: int
    host: str
    checkpoint: int
    tokens: str
    proof_hash: str
    status: str
    reason: str


class Verifier:
    """Checks ``share`` (0..1) of the checkpoints with the local ``model``; ``tokenize``
    must render prompts as the host's backend does."""

    def __init__(
        self,
        share: float,
        model: Model,
        tokenize: Tokenize,
        registry: CollectorRegistry,
        *,
        seed: int | None = None,
    ) -> None:
        self.share = share
        self._model = model
        self._tokenize = tokenize
        self._random = random.Random(seed)
        self._seen: dict[int, set[str]] = {}  # session id -> proof hashes considered
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="inferledger-verify")
        self.checked: list[Checked] = []
        self.failed: dict[int, int] = {}
        """Session id -> the bundle index (the host's) of its first failed checkpoint."""
        self.verified = Counter(
            "inferledger_gateway_checkpoints_verified",
            "Checkpoints re-verified by prefill, by verdict",
            ["status"],
            registry=registry,
        )

    def submit(self, record: SessionRecord) -> None:
        """Sample the session's checkpoints not seen before and check them in the
        background; ``record`` must be a copy the caller no longer changes."""
        seen = self._seen.setdefault(record.session_id, set())
        fresh = [cp for cp in checkpoints(record) if cp.proof_hash_hex not in seen]
        seen.update(cp.proof_hash_hex for cp in fresh)
        sampled = {cp.index for cp in fresh if self._random.random() < self.share}
        if sampled:
            self._pool.submit(self._check, record, sampled)

    def _check(self, record: SessionRecord, sampled: set[int]) -> None:
        replies = transcripts(record, self._tokenize)
        after = 0
        for checkpoint in checkpoints(record):
            bundle = None
            if checkpoint.index in sampled:
                try:
                    bundle = fetch_bundle(checkpoint)
                    verdict = verify_checkpoint(
                        record, checkpoint, bundle, self._model, replies, after=after
                    )
                except BundleUnavailable as exc:
                    verdict = missing_bundle(checkpoint, exc.problem)
                self._record(record, verdict)
                if verdict.status == "fail" and bundle is not None and verdict.evidence:
                    # Only a failed re-run convicts: jurors call any other failure the
                    # challenger's (docs/disputes.md), and the bond would be lost.
                    with self._lock:
                        self.failed.setdefault(record.session_id, bundle.checkpoint_index)
            after = next_after(after, checkpoint, bundle)

    def _record(self, record: SessionRecord, verdict: CheckpointVerdict) -> None:
        checked = Checked(
            record.session_id,
            record.host,
            verdict.checkpoint,
            verdict.tokens,
            verdict.proof_hash,
            verdict.status,
            verdict.reason,
        )
        with self._lock:
            self.checked.append(checked)
        self.verified.labels(verdict.status).inc()
        if verdict.status == "fail":
            log.warning(
                "checkpoint %d (tokens %s) of session %d from host %s FAILED verification: %s",
                verdict.checkpoint,
                verdict.tokens,
                record.session_id,
                record.host,
                verdict.reason,
            )

    def failures(self) -> dict[int, int]:
        """Session id -> the host's bundle index of its first checkpoint whose re-run failed."""
        with self._lock:
            return dict(self.failed)

    def view(self) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(c) for c in self.checked]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
