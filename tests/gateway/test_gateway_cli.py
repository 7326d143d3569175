"""`inferledger gateway`: refuses an exposed bind without a key, in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from inferledger.cli.main import app


@pytest.fixture(autouse=True)
def no_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("INFERLEDGER_GATEWAY_API_KEY", raising=False)
    monkeypatch.setenv("INFERLEDGER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("INFERLEDGER_CONFIG", str(tmp_path / "none.toml"))


def test_binding_beyond_loopback_without_a_key_is_one_line_naming_the_setting() -> None:
    result = CliRunner().invoke(app, ["gateway", "--bind", "0.0.0.0"])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: setting gateway_api_key (INFERLEDGER_GATEWAY_API_KEY)")
    assert "bind 127.0.0.1" in line


def test_help_says_where_to_point_openai_clients() -> None:
    result = CliRunner().invoke(app, ["gateway", "--help"])
    assert result.exit_code == 0
    assert "OPENAI_BASE_URL" in result.output and "--port" in result.output
