"""The Node: everything one running host node holds, shared by all its connections."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from eth_account.signers.local import LocalAccount
from eth_utils import keccak

from inferledger.chain.contracts import Contracts
from inferledger.chain.receipts import ReceiptDomain
from inferledger.config import Settings
from inferledger.inference.base import Backend
from inferledger.node.metrics import NodeMetrics
from inferledger.node.preflight import PreflightReport
from inferledger.node.state import NodeState

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
    receipt_timeout: float = RECEIPT_TIMEOUT_SECONDS
    metrics: NodeMetrics = field(default_factory=NodeMetrics)
    live_sessions: set[int] = field(default_factory=set)
    _slots: asyncio.Semaphore | None = None
    _executor: ThreadPoolExecutor | None = None

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
        """A node whose preflight failed serves no paid sessions (R2)."""
        return self.preflight.ok

    @property
    def domain(self) -> ReceiptDomain:
        return self.contracts.marketplace.domain()

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

    from inferledger.node.preflight import run_preflight
    from inferledger.paths import home

    if settings.host_key is None:
        raise ValueError("no host key: set INFERLEDGER_HOST_KEY to the host's private key")
    account = Account.from_key(settings.host_key.get_secret_value())
    report = run_preflight(
        settings,
        chain=contracts.chain,
        deployment=contracts.deployment,
        model_name=backend.name,
        weights_path=backend.weights_path,
    )
    state = state or NodeState(settings.state_db or home() / "node.sqlite3")
    return Node(settings, contracts, account, backend, state, report)
