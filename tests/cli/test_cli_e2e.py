"""The issue's done-when, across processes: anvil, `inferledger deploy`, `model approve`,
`chain fund`, `host register`, `node run`, a non-interactive `chat`, then `session show`
says settled, `host earnings` shows the host's 90% and `verify` passes every checkpoint.
Also `inferledger chain` itself: it keeps the chain in its state file across restarts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from inferledger.chain.anvil import free_port, start_anvil
from inferledger.chain.connect import connect
from inferledger.chain.devchain import dev_account

CLI = [sys.executable, "-m", "inferledger.cli.main"]
HOST = dev_account("cli-e2e-host")
USER = dev_account("cli-e2e-user")


def _env(tmp_path: Path, url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERLEDGER_")}
    return {
        **env,
        "INFERLEDGER_HOME": str(tmp_path / "home"),
        "INFERLEDGER_CHAIN_URL": url,
        "INFERLEDGER_DEPLOYMENT_FILE": str(tmp_path / "deployment.json"),
        "INFERLEDGER_STATE_DB": str(tmp_path / "node.sqlite3"),
        "INFERLEDGER_HOST_KEY": "0x" + HOST.key.hex(),
        "INFERLEDGER_KEY": "0x" + USER.key.hex(),
        "INFERLEDGER_CONFIG": str(tmp_path / "none.toml"),
    }


def _run(env: dict[str, str], *args: str) -> str:
    """Run one command; its stdout and stderr, which must say nothing of an error."""
    done = _call(env, *args)
    assert done.returncode == 0, f"inferledger {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    assert "error:" not in done.stderr
    return done.stdout + done.stderr


def _call(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def _wait_healthy(port: int, node: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert node.poll() is None, "the node exited"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"node on port {port} never answered /health with 200")


def test_chat_settles_and_pays_the_host_ninety_percent(tmp_path: Path) -> None:
    with start_anvil() as anvil:
        env = _env(tmp_path, anvil.url)
        _run(env, "deploy")
        approved = _run(env, "model", "approve", "scripted/words", "--sha256", "ab" * 32)
        assert "approved scripted/words" in approved
        for account in (HOST, USER):
            funded = _run(env, "chain", "fund", account.address, "--eth", "1", "--usdc", "100")
            assert "+100.000000 USDC" in funded
        port = free_port()
        url = f"ws://127.0.0.1:{port}/v1/ws"
        registered = _run(env, "host", "register", "--url", url, "--model", "scripted/words",
                           "--price", "0.002")  # fmt: skip
        assert "registered host " + HOST.address in registered

        node = subprocess.Popen(
            [*CLI, "node", "run", "--backend", "scripted", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_healthy(port, node)
            chat = _call(env, "chat", "--model", "scripted/words", "--message",
                         "What does the ledger record?", "--max-tokens", "150")  # fmt: skip
            assert chat.returncode == 0, chat.stderr
            assert "ledger" in chat.stdout  # the streamed reply, alone on stdout
            # Free prompts (no --input-price): 150 tokens x 0.002, the prompt counted too.
            assert "output tokens, cost so far 0.300000 of 2.000000 USDC" in chat.stderr
            match = re.search(r"session (\d+) settled: ([1-9]\d*) input \+ 150 output tokens",
                              chat.stderr)  # fmt: skip
            assert match, chat.stderr
            session_id, input_tokens = match.groups()

            shown = _run(env, "session", "show", session_id)
            assert f"session {session_id}: settled" in shown
            assert f"tokens paid input {input_tokens}, output 150" in shown
            assert "settled: host 0.270000, fee 0.030000, refund 1.700000 USDC" in shown

            earnings = _run(env, "host", "earnings")
            assert f"host {HOST.address} earnings: 0.270000 USDC" in earnings

            # Proofs every 100 tokens, receipts at least every 32 (the window) and at most
            # every 16: 3 to 6 receipts before the first bundle name none; the bundles
            # [0, 100) and [100, 150) are each checked once.
            verified = _run(env, "verify", session_id, "--backend", "scripted")
            assert "2 pass, 0 fail, 0 unproven" in verified
            unnamed = re.search(r"(\d+) of (\d+) receipts name no proof bundle", verified)
            assert unnamed, verified
            assert 3 <= int(unnamed[1]) <= 6 and 6 <= int(unnamed[2]) <= 11, verified
        finally:
            node.send_signal(signal.SIGINT)
            node.wait(timeout=20)


def test_chain_keeps_its_state_across_restarts(tmp_path: Path) -> None:
    env = _env(tmp_path, "embedded")
    state = tmp_path / "anvil-state.json"
    port = free_port()
    dead = "0x000000000000000000000000000000000000dEaD"

    def start() -> tuple[subprocess.Popen[str], str]:
        chain = subprocess.Popen(
            [*CLI, "chain", "--port", str(port), "--state", str(state)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert chain.stdout is not None
        banner = chain.stdout.readline()
        assert banner.startswith("anvil running at http://127.0.0.1:"), banner
        return chain, banner

    def stop(chain: subprocess.Popen[str]) -> str:
        chain.send_signal(signal.SIGINT)
        _, stderr = chain.communicate(timeout=30)
        assert chain.returncode == 0, stderr
        return stderr

    chain, banner = start()
    assert "new, saved to" in banner
    rpc = connect(f"http://127.0.0.1:{port}")
    assert rpc.w3.eth.get_balance(dev_account("user").address) > 0  # dev accounts get gas
    funded = _run(env, "chain", "fund", dead, "--eth", "3", "--usdc", "0", "--rpc", rpc.url)
    assert "+3 ETH" in funded
    assert "chain state saved to" in stop(chain)
    assert state.is_file()

    chain, banner = start()
    try:
        assert "resumed from" in banner
        assert connect(rpc.url).w3.eth.get_balance(dead) == 3 * 10**18
    finally:
        stop(chain)
