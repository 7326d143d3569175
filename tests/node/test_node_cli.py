"""`inferledger deploy` and `inferledger node run` as separate processes against anvil."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from inferledger.chain.anvil import free_port, start_anvil
from inferledger.chain.devchain import dev_account

CLI = [sys.executable, "-m", "inferledger.cli.main"]


def _env(tmp_path: Path, url: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "INFERLEDGER_CHAIN_URL": url,
        "INFERLEDGER_DEPLOYMENT_FILE": str(tmp_path / "deployment.json"),
        "INFERLEDGER_STATE_DB": str(tmp_path / "node.sqlite3"),
        "INFERLEDGER_HOST_KEY": "0x" + dev_account("unregistered-host").key.hex(),
        "INFERLEDGER_BACKEND": "scripted",
        **extra,
    }


def test_node_refuses_to_start_on_failed_preflight_unless_degraded(tmp_path: Path) -> None:
    with start_anvil() as anvil:
        env = _env(tmp_path, anvil.url)
        deployed = subprocess.run([*CLI, "deploy"], env=env, capture_output=True, text=True)
        assert deployed.returncode == 0, deployed.stderr
        assert (tmp_path / "deployment.json").exists()

        missing = tmp_path / "bin" / "zk-prover"  # the seed incident: no prover binary
        prover_env = {
            **env,
            "INFERLEDGER_PROVER": "external",
            "INFERLEDGER_EXTERNAL_PROVER": str(missing),
        }
        refused = subprocess.run(
            [*CLI, "node", "run"], env=prover_env, capture_output=True, text=True, timeout=120
        )
        assert refused.returncode == 1
        assert "node not started" in refused.stderr
        assert "not registered" in refused.stderr
        prover_lines = [line for line in refused.stderr.splitlines() if str(missing) in line]
        assert prover_lines, refused.stderr
        for line in prover_lines:
            assert "INFERLEDGER_EXTERNAL_PROVER" in line and "fix:" in line

        port = free_port()
        node = subprocess.Popen(
            [*CLI, "node", "run", "--allow-degraded", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            health = None
            for _ in range(300):
                try:
                    health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            assert health is not None, "degraded node never answered /health"
            assert health.status_code == 503
            assert health.json()["status"] == "degraded"
            assert health.json()["accepting_sessions"] is False
        finally:
            node.terminate()
            node.wait(timeout=10)
