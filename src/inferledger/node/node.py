"""The Node: everything one running host node holds, shared by all its connections."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from eth_account.signers.local import LocalAccount
from eth_utils import keccak

from inferledger.chain.contracts import Contracts
from inferledger.chain.receipts import ReceiptDomain
from inferledger.config import ConfigError, Settings
from inferledger.inference.base import Backend
from inferledger.node.chain_health import ChainHealth
from inferledger.node.metering import Meter, Terms
from inferledger.node.metrics import NodeMetrics
from inferledger.node.notices import SettlementNotices
from inferledger.node.outbox import Outbox, SettlementReason
from inferledger.node.preflight import PreflightReport, configured_prover, run_preflight
from inferledger.node.settlement import SettlementWorker
from inferledger.node.state import NodeState, SessionRecord, StateError
from inferledger.paths import home
from inferledger.proofs.provers import (
    CommitmentProver,
    Prover,
    ProverUnavailable,
)
from inferledger.store.blobs import BlobStore, default_store

RECEIPT_TIMEOUT_SECONDS = 60.0


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
    receipt_timeout: float = RECEIPT_TIMEOUT_SECONDS
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

    @property
    def address(self) -> str:
        return self.account.address

    @property
    def model_name(self) -> str:
        return self.backend.name

    @property
    def model_id(self) -> bytes:
        """keccak256 of the model's "repo/file" name, as the ModelRegistry keys it."""
        return keccak(text=self.backend.name)

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
                receipt_timeout=self.receipt_timeout,
                confirmations=self.confirmations,
            )
        return self._settlement

    @property
    def domain(self) -> ReceiptDomain:
        return self.contracts.marketplace.domain()

    def meter_for(self, record: SessionRecord) -> Meter:
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
            self._executor = ThreadPoolExecutor(
                self.settings.max_concurrent_generations, thread_name_prefix="generate"
            )
        return self._executor


def create_node(
    settings: Settings,
    *,
    contracts: Contracts,
    backend: Backend,
    state: NodeState | None = None,
) -> Node:
    """Load the host key, open the state and run the preflight; never raises on a failed check.

    Whether a degraded node may start is the caller's decision (``allow_degraded``).
    """
    from eth_account import Account

    if settings.host_key is None:
        raise ValueError("no host key: set INFERLEDGER_HOST_KEY to the host's private key")
    account = Account.from_key(settings.host_key.get_secret_value())
    prover, prover_error = _configured_prover(settings, contracts, backend)
    report = run_preflight(
        settings,
        chain=contracts.chain,
        deployment=contracts.deployment,
        model_name=backend.name,
        weights_path=backend.weights_path,
        prover=prover,
        prover_error=prover_error,
    )
    if not report.get("prover").ok:
        # Degraded: receipts still pay, with bundles that say they prove nothing.
        prover = CommitmentProver(unproven=True)
    market = contracts.marketplace.address
    state = state or NodeState(state_path(settings, contracts.chain.chain_id, market))
    try:
        state.bind_deployment(contracts.chain.chain_id, market)
    except StateError as exc:
        raise ConfigError(
            f"setting state_db (INFERLEDGER_STATE_DB): {exc}; each deployment needs its own "
            "state file, so point the setting at another one"
        ) from exc
    store = BlobStore(settings.proof_store) if settings.proof_store else default_store()
    return Node(settings, contracts, account, backend, state, report, prover, store)


def state_path(settings: Settings, chain_id: int, marketplace: str) -> Path:
    """The node's SQLite state: the ``state_db`` setting, else one file per deployment."""
    return settings.state_db or home() / "nodes" / f"{chain_id}-{marketplace}.sqlite3"


def _configured_prover(
    settings: Settings, contracts: Contracts, backend: Backend
) -> tuple[Prover | None, ProverUnavailable | None]:
    try:
        prover = configured_prover(
            settings,
            dev_chain=contracts.chain.is_dev,
            hidden_states=backend.supports_hidden_states,
        )
    except ProverUnavailable as exc:
        return None, exc
    return prover, None
