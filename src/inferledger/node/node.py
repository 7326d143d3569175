"""The Node: everything one running host node holds, shared by all its connections."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from eth_account.signers.local import LocalAccount

from inferledger.chain.contracts import Contracts
from inferledger.chain.keccak import keccak256
from inferledger.chain.receipts import ReceiptDomain, sign_host_challenge
from inferledger.config import Settings
from inferledger.inference.base import Backend
from inferledger.node.chain_health import ChainHealth
from inferledger.node.compose import NodeParts, build_node_parts
from inferledger.node.metering import Meter, Terms
from inferledger.node.metrics import NodeMetrics
from inferledger.node.notices import SettlementNotices
from inferledger.node.outbox import Outbox, SettlementReason
from inferledger.node.preflight import PreflightFailed, PreflightReport
from inferledger.node.settlement import SettlementWorker
from inferledger.node.state import HostedSession, NodeState
from inferledger.node.threads import named_pool
from inferledger.proofs.provers import Prover
from inferledger.store.blobs import BlobStore


@dataclass
class Node:
    """A host node: its chain view, key, model, state and live sessions."""

    settings: Settings
    contracts: Contracts
    account: LocalAccount
    backend: Backend
    state: NodeState
    preflight: PreflightReport
    prover: Prover
    store: BlobStore
    metrics: NodeMetrics = field(default_factory=NodeMetrics)
    notices: SettlementNotices = field(default_factory=SettlementNotices)
    # session id -> how to stop its live connection; one entry per session (SESSION_BUSY)
    live: dict[int, Callable[[SettlementReason], None]] = field(default_factory=dict)
    # session id -> its billing meter; outlives connections, so a reconnect resets nothing
    meters: dict[int, Meter] = field(default_factory=dict)
    loop: asyncio.AbstractEventLoop | None = None
    _slots: asyncio.Semaphore | None = None
    _executor: ThreadPoolExecutor | None = None
    health: ChainHealth | None = None
    _settlement: SettlementWorker | None = None

    def __post_init__(self) -> None:
        if self.health is None:
            self.health = ChainHealth(self.metrics)

    @classmethod
    def from_parts(cls, parts: NodeParts) -> Node:
        """The node made of ``parts``; refused, even degraded, without the chain, contracts
        and host key every session needs (the failed preflight lines say which)."""
        if parts.contracts is None or parts.account is None or parts.state is None:
            parts.close()
            raise PreflightFailed(
                "node not started: it needs a chain, its contracts and a host key even "
                "when degraded; fix these:\n"
                + "\n".join(f"  {r.line()}" for r in parts.preflight.failures)
            )
        return cls(
            parts.settings,
            parts.contracts,
            parts.account,
            parts.backend,
            parts.state,
            parts.preflight,
            parts.prover,
            parts.store,
        )

    @property
    def address(self) -> str:
        return self.account.address

    @property
    def model_name(self) -> str:
        return self.backend.name

    @property
    def model_id(self) -> bytes:
        """keccak256 of the model's "repo/file" name, as the ModelRegistry keys it."""
        return keccak256(self.backend.name.encode())

    @property
    def ready(self) -> bool:
        """A node whose preflight failed serves no paid sessions (R2).

        The one exception is the prover with ``allow_degraded``: payment rests on the signed
        receipts, so the node serves with unproven commitment bundles instead of proofs.
        """
        tolerated = {"prover"} if self.settings.allow_degraded else set()
        return all(r.ok for r in self.preflight.results if r.name not in tolerated)

    @property
    def prover_degraded(self) -> bool:
        """The configured prover failed its preflight: checkpoints carry unproven bundles."""
        return not self.preflight.get("prover").ok

    @property
    def outbox(self) -> Outbox:
        return Outbox(self.state)

    @property
    def confirmations(self) -> int:
        """Blocks that make a settlement final: the setting, else 1 on dev chains (they do not
        reorganise by themselves) and 3 elsewhere."""
        if self.settings.confirmations is not None:
            return self.settings.confirmations
        return 1 if self.contracts.chain.is_dev else 3

    @property
    def settlement(self) -> SettlementWorker:
        """The node's settlement worker (started with the server, see ``server.py``)."""
        if self._settlement is None:
            assert self.health is not None
            self._settlement = SettlementWorker(
                self.settings,
                state=self.state,
                contracts=self.contracts,
                sender=self.contracts.chain.sender(self.account),
                metrics=self.metrics,
                notices=self.notices,
                health=self.health,
                stop_live=self.request_stop,
                confirmations=self.confirmations,
            )
        return self._settlement

    @property
    def domain(self) -> ReceiptDomain:
        return self.contracts.marketplace.domain()

    @property
    def plaintext_sessions(self) -> bool:
        """Unencrypted sessions are taken only when the setting asks for them on a dev chain."""
        return self.settings.allow_plaintext_sessions and self.contracts.chain.is_dev

    def sign_challenge(self, nonce: bytes, node_key: bytes) -> bytes:
        """The host key's ``HostChallenge`` signature: proof to the client that this is the
        host the chain names, and that ``node_key`` is its key for this connection."""
        return sign_host_challenge(self.account.key, self.domain, nonce, node_key)

    def meter_for(self, record: HostedSession) -> Meter:
        """The session's meter: the live one, else rebuilt from what the state recorded."""
        meter = self.meters.get(record.session_id)
        if meter is None:
            meter = Meter(
                Terms(record.deposit, record.input_price_per_mtok, record.output_price_per_mtok),
                self.settings.max_unreceipted_tokens,
                served=record.served,
                receipted=record.receipted,
                tail=list(record.served_tail),
                abandoned=record.abandoned,
            )
            self.meters[record.session_id] = meter
        return meter

    def request_stop(self, session_id: int, reason: SettlementReason) -> bool:
        """From any thread: ask the session's live connection to stop serving, collect the
        final receipt and settle. False when no connection is live (settle directly)."""
        stop, loop = self.live.get(session_id), self.loop
        if stop is None or loop is None or loop.is_closed():
            return False
        loop.call_soon_threadsafe(stop, reason)
        return True

    def generation_slots(self) -> asyncio.Semaphore:
        """Limits concurrent generations per backend; created in the serving loop."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.settings.max_concurrent_generations)
        return self._slots

    def generation_executor(self) -> ThreadPoolExecutor:
        """One worker thread per generation slot, apart from the loop's default pool."""
        if self._executor is None:
            self._executor = named_pool(self.settings.max_concurrent_generations, "generate")
        return self._executor


def create_node(
    settings: Settings,
    *,
    contracts: Contracts,
    backend: Backend,
    state: NodeState | None = None,
) -> Node:
    """A node over given contracts and backend (tests, the demo, benchmarks), built by the
    same composition root as ``node run``; never raises on a failed check.

    Whether a degraded node may start is the caller's decision (``allow_degraded``).
    """
    parts = build_node_parts(settings, contracts=contracts, backend=backend, state=state)
    return Node.from_parts(parts)
