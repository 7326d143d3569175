"""Building checkpoints: a reply's tokens and hidden rows in, a stored, signed bundle out.

A connection keeps a :class:`ReplyTrace` per reply. At every ``proof_interval`` tokens and at
the end of each reply it takes the segment not yet proved and hands it to
:func:`build_checkpoint`, which proves in a worker thread (falling back to an unproven
commitment if the prover fails, so payment never waits on it), stores the bundle under its
hash, and writes the checkpoint to the outbox before the receipt is even requested.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from inferledger.inference.base import Backend, Hidden, Message, UnsupportedFeature
from inferledger.node.node import Node
from inferledger.node.outbox import CheckpointRecord
from inferledger.proofs.provers import (
    CheckpointWork,
    ProvedCheckpoint,
    SegmentWork,
    prove_checkpoint,
)
from inferledger.proofs.sampling import GREEDY, Sampling

log = logging.getLogger("inferledger.node")


def prompt_token_ids(backend: Backend, messages: Sequence[Message]) -> list[int]:
    """The prompt's token ids; the bytes of the canonical chat when the backend has no
    tokenizer (a remote server), so the bundle still commits to exactly this prompt."""
    try:
        return backend.tokenize_chat(messages)
    except UnsupportedFeature:
        return list(json.dumps(list(messages), sort_keys=True, separators=(",", ":")).encode())


class ReplyTrace:
    """One reply as streamed: prompt ids, token ids and the hidden rows not yet proved."""

    def __init__(
        self, prompt_ids: Sequence[int], *, keep_rows: bool, sampling: Sampling = GREEDY
    ) -> None:
        self.prompt_ids = tuple(prompt_ids)
        self.sampling = sampling
        self.reply_ids: list[int] = []
        self.keep_rows = keep_rows
        self.proved = 0  # reply tokens already covered by a checkpoint
        self.covered = 0  # positions whose rows have arrived
        self._rows: list[Hidden] = []

    def add_token(self, token_id: int) -> None:
        self.reply_ids.append(token_id)

    def add_rows(self, hidden: Hidden) -> None:
        if hidden.start != self.covered:
            raise ValueError(f"hidden rows start at {hidden.start}, expected {self.covered}")
        self.covered += len(hidden.rows)
        if self.keep_rows:
            self._rows.append(hidden)

    @property
    def unproved(self) -> int:
        return len(self.reply_ids) - self.proved

    def rows_ready(self) -> bool:
        """Whether the row of every token sent so far has arrived (always, without rows)."""
        return not self.keep_rows or self.covered >= len(self.prompt_ids) + len(self.reply_ids)

    def take_segment(self) -> SegmentWork:
        """The tokens since the last checkpoint, with their rows when all have arrived."""
        first = 0 if self.proved == 0 else len(self.prompt_ids) + self.proved
        end = len(self.prompt_ids) + len(self.reply_ids)
        rows = None
        if self.keep_rows and self.covered >= end:
            stacked = np.concatenate([h.rows for h in self._rows])
            offset = self._rows[0].start
            rows = stacked[first - offset : end - offset]
            # Keep only rows a later segment of this reply still needs.
            self._rows = [Hidden(end, stacked[end - offset :])] if self.covered > end else []
        segment = SegmentWork(
            prompt_ids=self.prompt_ids,
            reply_ids=tuple(self.reply_ids),
            reply_start=self.proved,
            hidden_states=rows,
            sampling=self.sampling,
        )
        self.proved = len(self.reply_ids)
        return segment


@dataclass(frozen=True)
class CheckpointJob:
    """What a connection knows when a checkpoint is due."""

    session_id: int
    token_start: int
    token_end: int
    transcript_hash: bytes
    segment: SegmentWork
    salt: bytes


async def build_checkpoint(node: Node, job: CheckpointJob) -> CheckpointRecord:
    """Prove, sign and store one checkpoint in a worker thread, then record it in the next
    group commit (with other sessions' receipts, not a commit of its own)."""
    proved, record = await asyncio.to_thread(_prove_and_store, node, job)
    await node.outbox.aadd_checkpoint(record)
    _report(node, job, proved, record)
    return record


def _prove_and_store(node: Node, job: CheckpointJob) -> tuple[ProvedCheckpoint, CheckpointRecord]:
    """The blocking part: prove and sign the bundle, store it under its hash."""
    segment = _with_rows(node, job.segment)
    index = node.outbox.next_checkpoint_index(job.session_id)
    work = CheckpointWork(
        session_id=job.session_id,
        chain_id=node.contracts.chain.chain_id,
        marketplace=node.contracts.marketplace.address,
        checkpoint_index=index,
        model_id=node.model_id,
        token_start=job.token_start,
        token_end=job.token_end,
        transcript_hash=job.transcript_hash,
        segments=(segment,),
        backend=node.backend.engine,
        dtype=node.backend.dtype,
        sampler=node.backend.sampler,
        salt=job.salt,
    )
    proved = prove_checkpoint(node.prover, work, bytes(node.account.key))
    node.store.put(proved.encoded)
    bundle = proved.bundle
    record = CheckpointRecord(
        session_id=job.session_id,
        idx=index,
        token_start=job.token_start,
        token_end=job.token_end,
        proof_hash=proved.proof_hash,
        transcript_hash=job.transcript_hash,
        prover=bundle.prover,
        unproven=bundle.unproven,
        proof_bytes=len(proved.encoded),
        proof_ms=proved.seconds * 1000,
        prover_error=proved.error,
        status="proved",
    )
    return proved, record


def _report(
    node: Node, job: CheckpointJob, proved: ProvedCheckpoint, record: CheckpointRecord
) -> None:
    """Metrics and the log line of a recorded checkpoint."""
    bundle = proved.bundle
    metrics = node.metrics
    metrics.proof_seconds.labels(prover=bundle.prover).observe(proved.seconds)
    metrics.proof_bytes.observe(len(proved.encoded))
    # An unproven bundle proves nothing: it is counted apart, and a node running without its
    # prover (degraded) counts each one as a prover failure, like a fallback.
    metrics.checkpoints.labels(state="unproven" if bundle.unproven else "proved").inc()
    if proved.fell_back or node.prover_degraded:
        metrics.prover_failures.inc()
    if proved.fell_back:
        log.error(
            "session %s: prover %r failed for checkpoint %s (%s); fell back to an unproven "
            "commitment bundle, payment goes on",
            job.session_id,
            node.prover.name,
            record.idx,
            proved.error,
        )
    log.info(
        "session %s: proof generated: checkpoint %s, tokens %s-%s, %s bytes, %.1f ms (%s%s), "
        "proof_hash 0x%s",
        job.session_id,
        record.idx,
        job.token_start,
        job.token_end,
        len(proved.encoded),
        proved.seconds * 1000,
        bundle.prover,
        ", unproven" if bundle.unproven else "",
        proved.proof_hash.hex(),
    )


def _with_rows(node: Node, segment: SegmentWork) -> SegmentWork:
    """Rows missing because a reply was cut short are recomputed by one prefill."""
    if segment.hidden_states is not None or not node.prover.needs_hidden_states:
        return segment
    if not node.backend.supports_hidden_states:
        return segment
    ids = list(segment.prompt_ids) + list(segment.reply_ids)
    first = 0 if segment.reply_start == 0 else len(segment.prompt_ids) + segment.reply_start
    states = node.backend.prefill_hidden_states(ids)
    return dataclasses.replace(segment, hidden_states=states[first:])
