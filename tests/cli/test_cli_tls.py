"""`host register` and `host update --url` warn, on stderr and in yellow, about a node URL
without TLS on a non-dev chain, and stay quiet on a dev chain (docs/operators.md, "Serving
over TLS"). In process, on the world's chain; a public chain is the same chain with
``is_dev`` turned off."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from inferledger.chain.devchain import DEV_MODEL_NAME, DevWorld
from inferledger.chain.units import usdc
from inferledger.cli.main import app
from inferledger.paths import home

PLAIN = "traffic metadata and the session handshake travel unprotected by TLS"
LOOPBACK = "is a loopback address, which clients of a non-dev chain cannot reach"


@pytest.fixture(autouse=True)
def cli_env(world: DevWorld, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The CLI on the world's chain (the embedded one too: connect_chain is bypassed) and
    its deployment, signing as a funded host that is not registered yet. The data home
    stays, so the compiled contracts are not compiled again for every command."""
    data_home = home()
    for name in list(os.environ):
        if name.startswith("INFERLEDGER_"):
            monkeypatch.delenv(name)
    deployment = tmp_path / "deployment.json"
    world.contracts.deployment.save(deployment)
    newcomer = world.funded_sender("tls-host", usdc("100"))
    monkeypatch.setenv("INFERLEDGER_HOME", str(data_home))
    monkeypatch.setenv("INFERLEDGER_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("INFERLEDGER_DEPLOYMENT_FILE", str(deployment))
    monkeypatch.setenv("INFERLEDGER_HOST_KEY", "0x" + bytes(newcomer.account.key).hex())
    monkeypatch.setattr("inferledger.cli.common.connect_chain", lambda settings: world.chain)


def register(url: str | None) -> Result:
    args = ["host", "register", "--model", DEV_MODEL_NAME, "--price", "0.002"]
    result = CliRunner().invoke(app, [*args, *(["--url", url] if url else [])])
    assert result.exit_code == 0, result.output
    assert "registered host " in result.stdout
    return result


def test_no_warning_on_a_dev_chain(world: DevWorld) -> None:
    assert world.chain.is_dev
    result = register(None)  # the dev default, http://127.0.0.1:<node_port>
    assert "url   http://127.0.0.1:8080" in result.stdout
    assert result.stderr == ""
    updated = CliRunner().invoke(app, ["host", "update", "--url", "http://node.example.com"])
    assert updated.exit_code == 0, updated.output
    assert "url set to http://node.example.com" in updated.stdout
    assert updated.stderr == ""


def test_plain_url_on_a_public_chain_is_one_yellow_warning(
    world: DevWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(world.chain, "is_dev", False)
    monkeypatch.setenv("FORCE_COLOR", "1")  # so rich writes the style it was asked for
    result = register("http://node.example.com:8080")
    assert "warning" not in result.stdout  # stdout stays what a script reads
    (line,) = result.stderr.strip().splitlines()
    assert "\x1b[33m" in line  # yellow
    assert ("warning: node URL http://node.example.com:8080 is plain http://: " + PLAIN) in line
    assert "sessions are end-to-end encrypted" in line
    assert "https://, served behind a TLS reverse proxy" in line
    assert 'docs/operators.md, "Serving over TLS"' in line


def test_tls_url_on_a_public_chain_is_not_warned_about(
    world: DevWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(world.chain, "is_dev", False)
    result = register("https://node.example.com")
    assert result.stderr == ""


def test_loopback_url_on_a_public_chain_says_it_is_unreachable(
    world: DevWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(world.chain, "is_dev", False)
    result = register("ws://127.0.0.1:8080")
    assert f"warning: node URL ws://127.0.0.1:8080 {LOOPBACK}" in result.stderr
    assert PLAIN not in result.stderr


def test_update_url_warns_too(world: DevWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    register("https://node.example.com")
    monkeypatch.setattr(world.chain, "is_dev", False)
    runner = CliRunner()
    plain = runner.invoke(app, ["host", "update", "--url", "ws://node.example.com"])
    assert plain.exit_code == 0, plain.output
    assert "url set to ws://node.example.com" in plain.stdout
    assert f"warning: node URL ws://node.example.com is plain ws://: {PLAIN}" in plain.stderr
    tls = runner.invoke(app, ["host", "update", "--url", "wss://node.example.com"])
    assert tls.exit_code == 0, tls.output
    assert "warning" not in tls.output
