"""The composition root: the one place a node's parts are built from the settings.

``inferledger node run`` and ``inferledger doctor`` both call :func:`build_node_parts`, so
the preflight that doctor prints is the preflight over the very parts the node would serve
with (docs/architecture.md, "Composition root"). Parts are built in dependency order; a
part that cannot be built is left out and the preflight check about it says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount

from inferledger.chain.connect import EMBEDDED, Chain, connect
from inferledger.chain.contracts import Contracts
from inferledger.chain.deployment import Deployment
from inferledger.chain.errors import ChainError, ChainUnreachable
from inferledger.chain.redact import CHAIN_UNAVAILABLE, redact_url
from inferledger.config import ConfigError, Settings, setting_ref
from inferledger.inference import Backend, BackendUnavailable, load_backend
from inferledger.node.preflight import Built, PreflightReport, run_preflight
from inferledger.node.state import NodeState, StateError
from inferledger.paths import home
from inferledger.proofs.provers import CommitmentProver, Prover, ProverUnavailable, make_prover
from inferledger.store.blobs import BlobStore, default_store

log = logging.getLogger("inferledger.node")


@dataclass(frozen=True)
class NodeParts:
    """Everything a node is made of, and the preflight run over exactly these parts.

    ``contracts``, ``account`` and ``state`` are None when they could not be built (no
    chain, no deployment, no valid host key); the preflight then has a failed line for it.
    ``prover`` is the configured prover, or unproven commitments when its check failed.
    """

    settings: Settings
    contracts: Contracts | None
    account: LocalAccount | None
    backend: Backend
    prover: Prover
    state: NodeState | None
    store: BlobStore
    preflight: PreflightReport

    def close(self) -> None:
        """Release what the parts hold open (the state database), for callers that stop
        after the preflight."""
        if self.state is not None:
            self.state.close()


def build_node_parts(
    settings: Settings,
    *,
    chain: Chain | None = None,
    contracts: Contracts | None = None,
    backend: Backend | None = None,
    state: NodeState | None = None,
) -> NodeParts:
    """Build chain, contracts, backend, prover, account, state and store, then run the
    preflight over them.

    Arguments stand in for the parts built from the settings (tests; the embedded chain can
    only be passed in, as every connect to it makes a new, empty chain). Raises only for
    what no preflight line can describe: a refused setting or a backend that cannot load.
    """
    deployment: Deployment | None
    if contracts is not None:
        chain, chain_error = contracts.chain, ""
        deployment, source, deployment_error = contracts.deployment, "given by the caller", ""
    else:
        chain, chain_error = (chain, "") if chain is not None else _connect(settings)
        source = str(settings.deployment_file)
        deployment, deployment_error = _load_deployment(settings.deployment_file)
        contracts = _attach(chain, deployment)
    backend = backend or backend_from_settings(settings)
    prover, prover_error = _prover(settings, chain, backend)
    account = _host_account(settings)
    if contracts is not None:
        state = _bound_state(settings, contracts, state)
    store = BlobStore(settings.proof_store) if settings.proof_store else default_store()
    report = run_preflight(
        settings,
        Built(
            chain=chain,
            chain_error=chain_error,
            deployment=deployment,
            deployment_source=source,
            deployment_error=deployment_error,
            contracts=contracts,
            account=account,
            model_name=backend.name,
            weights_path=backend.weights_path,
            prover=prover,
            prover_error=prover_error,
        ),
    )
    if prover is None or not report.get("prover").ok:
        # Degraded: receipts still pay, with bundles that say they prove nothing.
        prover = CommitmentProver(unproven=True)
    return NodeParts(settings, contracts, account, backend, prover, state, store, report)


def backend_from_settings(settings: Settings) -> Backend:
    """The configured backend, named by the model_name setting when it is set."""
    options: dict[str, Any] = {}
    if settings.backend == "openai_http":
        if not settings.upstream_url:
            raise ConfigError(
                f"{setting_ref('upstream_url')}: required by the openai_http backend; set it "
                "to the OpenAI-compatible server's URL"
            )
        options = {"base_url": settings.upstream_url, "model": settings.model_name or "default"}
    elif settings.model_name:
        options["name"] = settings.model_name
    if settings.backend == "scripted" and settings.scripted_tokens_per_second:
        options["tokens_per_second"] = settings.scripted_tokens_per_second
    if settings.backend == "transformers":
        options |= {
            "num_threads": 1,
            "dtype": settings.model_dtype,
            "max_batch": settings.max_concurrent_generations,
            "progress": lambda stage: log.info("model: %s", stage),
        }
    if settings.backend == "llama_cpp":
        options |= {
            "num_threads": 1,
            "sequences": settings.max_concurrent_generations,
            "progress": lambda stage: log.info("model: %s", stage),
        }
    if settings.backend in ("transformers", "llama_cpp") and settings.weights_path is not None:
        options["gguf_path"] = settings.weights_path
    try:
        return load_backend(settings.backend, **options)
    except OSError as exc:
        raise BackendUnavailable(
            f"{setting_ref('weights_path')}: cannot read the weights file ({exc})"
        ) from exc


def state_path(settings: Settings, chain_id: int, marketplace: str) -> Path:
    """The node's SQLite state: the ``state_db`` setting, else one file per deployment."""
    return settings.state_db or home() / "nodes" / f"{chain_id}-{marketplace}.sqlite3"


def _connect(settings: Settings) -> tuple[Chain | None, str]:
    """The configured chain, or None and why it cannot be reached."""
    url = settings.chain_url
    if url == EMBEDDED:
        raise ConfigError(
            f"{setting_ref('chain_url')}: a node needs a chain other processes can reach; "
            "start one (e.g. anvil) and set its URL, or run `inferledger demo`"
        )
    try:
        return connect(url, **settings.sender_options()), ""
    except ChainUnreachable:
        return None, f"{CHAIN_UNAVAILABLE} at {redact_url(url)}"
    except ChainError as exc:
        return None, str(exc)
    except Exception as exc:
        return None, f"{CHAIN_UNAVAILABLE} at {redact_url(url)} ({type(exc).__name__})"


def _load_deployment(path: Path) -> tuple[Deployment | None, str]:
    try:
        return Deployment.load(path), ""
    except FileNotFoundError:
        return None, f"deployment file {path} not found"
    except Exception as exc:
        problem = type(exc).__name__
        return None, f"deployment file {path} is not a valid deployment record ({problem})"


def _attach(chain: Chain | None, deployment: Deployment | None) -> Contracts | None:
    """The deployment's contracts on this chain; None on another chain (the chain check
    reports the mismatch)."""
    if chain is None or deployment is None or chain.chain_id != deployment.chain_id:
        return None
    return Contracts.attach(chain, deployment)


def _prover(
    settings: Settings, chain: Chain | None, backend: Backend
) -> tuple[Prover | None, ProverUnavailable | None]:
    """The prover the settings ask for, or why not; none without a chain (mock proofs
    depend on it being a dev chain)."""
    if chain is None:
        return None, None
    try:
        prover = make_prover(
            settings.prover,
            dev_chain=chain.is_dev,
            hidden_states=backend.supports_hidden_states,
            external_path=settings.external_prover,
            external_timeout=settings.external_prover_timeout,
        )
    except ProverUnavailable as exc:
        return None, exc
    return prover, None


def _bound_state(settings: Settings, contracts: Contracts, state: NodeState | None) -> NodeState:
    """The deployment's state database; one bound to another deployment is refused."""
    chain_id, market = contracts.chain.chain_id, contracts.marketplace.address
    state = state or NodeState(state_path(settings, chain_id, market))
    try:
        state.bind_deployment(chain_id, market)
    except StateError as exc:
        state.close()
        raise ConfigError(
            f"{setting_ref('state_db')}: {exc}; each deployment needs its own state file, so "
            "point the setting at another one"
        ) from exc
    return state


def _host_account(settings: Settings) -> LocalAccount | None:
    """The host's account; None when the key is missing or invalid (the host_key check
    says which, without echoing the key)."""
    if settings.host_key is None:
        return None
    try:
        account: LocalAccount = Account.from_key(settings.host_key.get_secret_value().strip())
        return account
    except Exception:
        return None
