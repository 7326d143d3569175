"""`inferledger doctor` and `inferledger node run` build the node from one composition root:
for every configuration they print the same preflight lines, and doctor fails exactly when
node run refuses to start."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from inferledger.chain.devchain import DEV_MODEL_NAME, DevWorld
from inferledger.cli.main import app
from inferledger.node import runner

PRICES = (500_000_000, 2_000_000_000)
REMOTE = "remote-org/remote-model"

CASES: dict[str, tuple[dict[str, str], bool]] = {
    "scripted, named as approved": ({"BACKEND": "scripted", "MODEL_NAME": DEV_MODEL_NAME}, True),
    # The known bug: doctor checked the packaged SmolLM2 name, node run 'scripted/words'.
    "scripted, its own name": ({"BACKEND": "scripted"}, False),
    "openai_http": (
        {"BACKEND": "openai_http", "UPSTREAM_URL": "http://127.0.0.1:9", "MODEL_NAME": REMOTE},
        True,
    ),
    "missing external prover": (
        {
            "BACKEND": "scripted",
            "MODEL_NAME": DEV_MODEL_NAME,
            "PROVER": "external",
            "EXTERNAL_PROVER": "/nonexistent/zk-prover",
        },
        False,
    ),
}


def node_env(world: DevWorld, tmp_path: Path, settings: dict[str, str]) -> dict[str, str]:
    """A node's environment on ``world`` (anvil), its host serving the dev model and a
    remote one, plus ``settings`` (names without the INFERLEDGER_ prefix)."""
    c = world.contracts
    remote_id = c.models.approve_model(world.owner, f"openai_http/{REMOTE}", b"\x01" * 32)
    c.nodes.set_models(world.host, {world.model_id: PRICES, remote_id: PRICES})
    c.deployment.save(tmp_path / "deployment.json")
    return {
        "INFERLEDGER_CHAIN_URL": world.chain.url,
        "INFERLEDGER_DEPLOYMENT_FILE": str(tmp_path / "deployment.json"),
        "INFERLEDGER_STATE_DB": str(tmp_path / "node.sqlite3"),
        "INFERLEDGER_PROOF_STORE": str(tmp_path / "proofs"),
        "INFERLEDGER_HOST_KEY": "0x" + bytes(world.host.account.key).hex(),
        **{f"INFERLEDGER_{name}": value for name, value in settings.items()},
    }


class _NoServer:
    """Stands in for uvicorn: node run got as far as serving."""

    started = 0

    def __init__(self, config: Any) -> None:
        pass

    def run(self) -> None:
        _NoServer.started += 1


@pytest.mark.parametrize("case", CASES)
def test_doctor_and_node_run_agree(
    world: DevWorld,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    case: str,
) -> None:
    if world.chain.is_embedded:
        pytest.skip("both commands connect to chain_url; the embedded chain lives in one process")
    settings, starts = CASES[case]
    env = node_env(world, tmp_path, settings)
    cli = CliRunner()

    doctor = cli.invoke(app, ["doctor"], env=env)
    doctor_lines = doctor.stdout.splitlines()

    monkeypatch.setattr(runner.uvicorn, "Server", _NoServer)
    started = _NoServer.started
    caplog.set_level(logging.INFO, logger="inferledger.node")
    run = cli.invoke(app, ["node", "run"], env=env)
    run_lines = [
        r.getMessage().removeprefix("preflight: ")
        for r in caplog.records
        if r.getMessage().startswith("preflight: ")
    ]

    assert run_lines == doctor_lines, doctor.output
    assert (doctor.exit_code == 0) is starts, doctor.output
    assert (run.exit_code == 0) is starts, run.output
    assert _NoServer.started - started == int(starts)
    if not starts:
        assert "node not started" in run.output
    (model,) = [line for line in doctor_lines if line.split()[1] == "model:"]
    assert settings.get("MODEL_NAME", "scripted/words") in model


def test_doctor_says_how_to_install_the_llama_extra_when_it_is_missing(
    world: DevWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if world.chain.is_embedded:
        pytest.skip("doctor connects to chain_url; the embedded chain lives in one process")
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now fails
    env = node_env(world, tmp_path, {"BACKEND": "llama_cpp"})
    doctor = CliRunner().invoke(app, ["doctor"], env=env)
    assert doctor.exit_code != 0
    (line,) = [line for line in doctor.output.splitlines() if "llama" in line]
    assert "llama_cpp backend needs llama-cpp-python" in line
    assert "inferledger[llama]" in line and "scripts/llama-wheel.sh" in line


def test_model_dtype_reaches_the_backend_and_its_bundles() -> None:
    """``model_dtype`` picks what the transformers backend computes in; bundles name it."""
    from inferledger.config import ConfigError, load_settings
    from inferledger.node.compose import backend_from_settings

    backend = backend_from_settings(load_settings(model_dtype="bfloat16"))
    assert (backend.engine, backend.dtype) == ("transformers", "bfloat16")
    rows = backend.prefill_hidden_states(backend.tokenize_chat([{"role": "user", "content": "hi"}]))
    assert rows.dtype.name == "float32"  # proofs take float32 rows whatever the model runs in
    with pytest.raises(ConfigError, match="INFERLEDGER_MODEL_DTYPE"):
        load_settings(model_dtype="float16")
