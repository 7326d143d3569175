"""A staked juror: watches the disputes it is drawn for, takes their evidence, judges, and
relays its signed verdict.

Evidence arrives at ``POST /v1/disputes/{id}/evidence`` from the challenger, who found this
juror's URL in the VerifierRegistry. It is accepted only while the dispute is open, from
nobody in particular (the chain authenticates it): the bundle must hash to the dispute's
bundle hash and the transcript to its commitment, and this verifier must sit on the jury,
so the transcript reaches jurors and nobody else who asks. A juror who has no evidence when
the verdict deadline nears votes *no fraud* (nothing was shown), so it is never silent.

The watch loop also keeps disputes moving for everyone: it draws a jury that is waiting
for one and replaces silent jurors after the deadline; both calls are open to anyone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from eth_utils.crypto import keccak
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from inferledger.chain.contracts import DISPUTE_OPEN, Contracts, DisputeInfo
from inferledger.chain.errors import ChainError
from inferledger.chain.receipts import ReceiptDomain, sign_verdict
from inferledger.chain.tx import TxSender
from inferledger.proofs.bundle import ProofBundle
from inferledger.proofs.evidence import MAX_TRANSCRIPT_BYTES
from inferledger.verifier.judge import DisputedCheckpoint, Judgement, judge

log = logging.getLogger("inferledger.verifier")

MAX_EVIDENCE_BYTES = 2 * MAX_TRANSCRIPT_BYTES + 2 * 1024 * 1024
"""Hex doubles the bytes; the bundle is far below the rest."""


class EvidenceRefused(Exception):
    """Evidence a juror will not take: ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.drawn = Counter("inferledger_verifier_drawn", "Disputes this juror sat on", registry=r)
        self.evidence = Counter(
            "inferledger_verifier_evidence",
            "Evidence deliveries by outcome",
            ["outcome"],
            registry=r,
        )
        self.verdicts = Counter(
            "inferledger_verifier_verdicts",
            "Verdicts relayed, by verdict and the stage that decided it",
            ["fraud", "stage"],
            registry=r,
        )
        self.chain_errors = Counter(
            "inferledger_verifier_chain_errors", "Chain calls that failed", registry=r
        )
        self.judge_seconds = Histogram(
            "inferledger_verifier_judge_seconds", "Time to judge one dispute", registry=r
        )


class VerifierService:
    """One juror: ``contracts`` and ``sender`` (its registered account), ``model`` (a
    backend to re-run: ``tokenize_chat``, ``prefill_hidden_states``, ``logits``)."""

    def __init__(
        self,
        contracts: Contracts,
        sender: TxSender,
        model: Any,
        *,
        private_key: bytes,
        poll_interval: float = 1.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.contracts = contracts
        self.sender = sender
        self.model = model
        self.address = sender.address
        self._key = private_key
        self.poll_interval = poll_interval
        self._clock = clock or self._chain_time
        self._evidence: dict[int, tuple[bytes, bytes]] = {}
        self._voted: dict[int, Judgement] = {}
        self._seen: set[int] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_id = 1  # the oldest dispute that may still be open
        self.metrics = _Metrics()
        self.domain = ReceiptDomain(contracts.chain.chain_id, contracts.disputes.address)
        # Fixed at deployment: read once, not at every look.
        self.jury_size = contracts.disputes.jury_size()
        self.verdict_period = contracts.disputes.verdict_period()

    # Evidence -------------------------------------------------------------------------

    def accept_evidence(self, dispute_id: int, bundle: bytes, transcript: bytes) -> None:
        """Keep the evidence for ``dispute_id`` if it is that dispute's and this juror's."""
        try:
            info = self.contracts.disputes.get_dispute(dispute_id)
        except ChainError as exc:
            raise EvidenceRefused(503, f"cannot read dispute {dispute_id}: {exc}") from None
        if info.session_id == 0:
            raise EvidenceRefused(404, f"no dispute {dispute_id} on chain")
        if info.status != DISPUTE_OPEN:
            raise EvidenceRefused(409, f"dispute {dispute_id} is no longer open")
        if self.address.lower() not in (j.lower() for j in info.seated):
            raise EvidenceRefused(
                403, f"this verifier ({self.address}) is not on the jury of dispute {dispute_id}"
            )
        if keccak(transcript) != info.transcript_commitment:
            raise EvidenceRefused(422, "the transcript does not hash to the dispute's commitment")
        try:
            signing_hash = ProofBundle.decode(bundle).signing_hash()
        except ValueError as exc:
            raise EvidenceRefused(422, f"not a proof bundle: {exc}") from None
        if signing_hash != info.bundle_hash:
            raise EvidenceRefused(422, "the bundle is not the one the dispute names")
        with self._lock:
            self._evidence[dispute_id] = (bundle, transcript)
        log.info("dispute %d: evidence accepted", dispute_id)
        self._wake.set()

    # The watch loop ---------------------------------------------------------------------

    def step(self) -> None:
        """One look at every dispute that may be open: draw, judge, vote, replace."""
        disputes = self.contracts.disputes
        count = disputes.dispute_count()
        oldest_open = None
        for dispute_id in range(self._next_id, count + 1):
            info = disputes.get_dispute(dispute_id)
            if info.status != DISPUTE_OPEN:
                continue
            oldest_open = oldest_open or dispute_id
            self._advance(dispute_id, info)
        self._next_id = oldest_open or count + 1

    def _advance(self, dispute_id: int, info: DisputeInfo) -> None:
        disputes = self.contracts.disputes
        seated = info.seated
        if len(seated) < self.jury_size:
            if self.contracts.chain.block_number() > info.draw_block:
                self._try("draw", dispute_id, lambda: disputes.draw(self.sender, dispute_id))
            return
        if self.address.lower() not in (j.lower() for j in seated):
            if info.verdict_deadline and self._clock() > info.verdict_deadline:
                self._try(
                    "replace silent jurors",
                    dispute_id,
                    lambda: disputes.replace_silent(self.sender, dispute_id),
                )
            return
        if dispute_id not in self._seen:
            self._seen.add(dispute_id)
            self.metrics.drawn.inc()
            log.info("dispute %d: drawn as a juror (session %d)", dispute_id, info.session_id)
        if disputes.has_voted(dispute_id, self.address):
            if self._clock() > info.verdict_deadline:
                self._try(
                    "replace silent jurors",
                    dispute_id,
                    lambda: disputes.replace_silent(self.sender, dispute_id),
                )
            return
        with self._lock:
            evidence = self._evidence.get(dispute_id)
        margin = max(1.0, self.verdict_period / 4)
        now = self._clock()
        if evidence is None and now < info.verdict_deadline - margin:
            return  # the challenger may still deliver
        if evidence is None:
            log.warning(
                "dispute %d: no evidence at chain time %d, %d s before the verdict deadline %d",
                dispute_id,
                now,
                info.verdict_deadline - now,
                info.verdict_deadline,
            )
        self._vote(dispute_id, info, evidence)

    def _vote(
        self, dispute_id: int, info: DisputeInfo, evidence: tuple[bytes, bytes] | None
    ) -> None:
        judgement = self._voted.get(dispute_id)
        if judgement is None:
            started = time.perf_counter()
            bundle, transcript = evidence or (None, None)
            judgement = judge(self._case(dispute_id, info), bundle, transcript, self.model)
            self.metrics.judge_seconds.observe(time.perf_counter() - started)
            self._voted[dispute_id] = judgement
            log.info(
                "dispute %d: %s (%s): %s",
                dispute_id,
                "FRAUD" if judgement.fraud else "no fraud",
                judgement.stage,
                judgement.reason,
            )
        signature = sign_verdict(self._key, self.domain, dispute_id, judgement.fraud)
        if self._try(
            "submit verdict",
            dispute_id,
            lambda: self.contracts.disputes.submit_verdict(
                self.sender, dispute_id, judgement.fraud, signature
            ),
        ):
            self.metrics.verdicts.labels(str(judgement.fraud).lower(), judgement.stage).inc()

    def _case(self, dispute_id: int, info: DisputeInfo) -> DisputedCheckpoint:
        session = self.contracts.marketplace.get_session(info.session_id)
        return DisputedCheckpoint(
            dispute_id=dispute_id,
            session_id=info.session_id,
            chain_id=self.contracts.chain.chain_id,
            marketplace=self.contracts.marketplace.address,
            host=session.host,
            model_id=session.model_id,
            checkpoint_index=info.checkpoint_index,
            bundle_hash=info.bundle_hash,
            transcript_commitment=info.transcript_commitment,
        )

    def _try(self, what: str, dispute_id: int, call: Callable[[], object]) -> bool:
        """Run one chain call; a failure is logged and retried at the next look."""
        try:
            call()
        except ChainError as exc:
            self.metrics.chain_errors.inc()
            log.warning("dispute %d: %s failed: %s", dispute_id, what, exc)
            return False
        log.info("dispute %d: %s", dispute_id, what)
        return True

    def _chain_time(self) -> float:
        return float(self.contracts.chain.now())

    def run_forever(self) -> None:
        """Look at the chain every ``poll_interval`` (sooner when evidence arrives)."""
        while not self._stop.is_set():
            try:
                self.step()
            except ChainError as exc:
                self.metrics.chain_errors.inc()
                log.warning("cannot read the disputes: %s (retrying)", exc)
            except Exception:  # a juror that dies is a silent juror: log, and look again
                log.exception("the verifier's look at the chain failed (retrying)")
            self._wake.wait(self.poll_interval)
            self._wake.clear()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="verifier", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def create_app(service: VerifierService) -> Starlette:
    """The juror's HTTP face: evidence in, health and metrics out."""

    async def evidence(request: Request) -> JSONResponse:
        text = request.path_params["dispute_id"]
        if not text.isdigit() or not 0 < int(text) < 2**64:
            return JSONResponse({"error": "BAD_REQUEST", "message": "bad dispute id"}, 400)
        body = await request.body()
        if len(body) > MAX_EVIDENCE_BYTES:
            return JSONResponse({"error": "TOO_LARGE", "message": "evidence too large"}, 413)
        try:
            doc = _json(body)
            bundle, transcript = _hex(doc, "bundle"), _hex(doc, "transcript")
        except ValueError as exc:
            service.metrics.evidence.labels("malformed").inc()
            return JSONResponse({"error": "BAD_REQUEST", "message": str(exc)}, 400)
        try:
            service.accept_evidence(int(text), bundle, transcript)
        except EvidenceRefused as exc:
            service.metrics.evidence.labels("refused").inc()
            return JSONResponse({"error": "REFUSED", "message": str(exc)}, exc.status)
        service.metrics.evidence.labels("accepted").inc()
        return JSONResponse({"accepted": True})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "verifier": service.address})

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(service.metrics.registry), media_type="text/plain")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            service.stop()

    return Starlette(
        routes=[
            Route("/v1/disputes/{dispute_id}/evidence", evidence, methods=["POST"]),
            Route("/health", health),
            Route("/metrics", metrics),
        ],
        lifespan=lifespan,
    )


def _json(body: bytes) -> dict[str, Any]:
    import orjson

    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ValueError("the body is not JSON") from None
    if not isinstance(doc, dict):
        raise ValueError("the body must be a JSON object with bundle and transcript")
    return doc


def _hex(doc: dict[str, Any], name: str) -> bytes:
    value = doc.get(name)
    if not isinstance(value, str) or not value.startswith("0x"):
        raise ValueError(f"{name} must be a 0x-prefixed hex string")
    try:
        return bytes.fromhex(value[2:])
    except ValueError:
        raise ValueError(f"{name} is not valid hex") from None
