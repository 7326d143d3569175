"""A program that exits or is interrupted with a session open still closes it (R1)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from inferledger.chain.devchain import dev_account
from inferledger.chain.units import usdc
from inferledger.protocol.client import prompt_token_bound

if TYPE_CHECKING:
    from sdk_support import Market

pytest_plugins = ["sdk_support"]
PROGRAM = Path(__file__).with_name("exit_program.py")
HELLO = [{"role": "user", "content": "hello"}]  # what the program sends


def test_exit_and_signals_close_open_sessions(market: Market, tmp_path: Path) -> None:
    world = market.world
    if world.chain.is_embedded:
        pytest.skip("another process cannot reach the embedded chain")
    deployment = tmp_path / "deployment.json"
    world.contracts.deployment.save(deployment)
    programs = {}
    for mode in ("exit", "sigterm", "sigint"):
        world.funded_sender(f"exit-{mode}", usdc("10"))
        env = {**os.environ, "INFERLEDGER_KEY": "0x" + dev_account(f"exit-{mode}").key.hex()}
        args = [world.chain.url, deployment, tmp_path / "sessions", market.server.ws_url]
        args += [world.host.address, "0x" + market.model_id.hex()]
        programs[mode] = subprocess.Popen(
            [sys.executable, PROGRAM, *map(str, args), "exit" if mode == "exit" else "wait"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    session_ids = {}
    for mode, program in programs.items():
        assert program.stdout is not None
        session_ids[mode] = int(program.stdout.readline())
        if mode != "exit":
            assert program.stdout.readline().strip() == "ready"
            program.send_signal(signal.SIGTERM if mode == "sigterm" else signal.SIGINT)
    # A generous bound: three programs start, close and settle at once on a loaded machine.
    outcomes = {mode: program.communicate(timeout=240) for mode, program in programs.items()}

    assert programs["exit"].returncode == 0
    assert programs["sigterm"].returncode == 128 + signal.SIGTERM
    assert programs["sigint"].returncode != 0
    assert "KeyboardInterrupt" in outcomes["sigint"][1]
    market_ = world.contracts.marketplace
    for mode, session_id in session_ids.items():
        stderr = outcomes[mode][1]
        assert f"closed session {session_id} at exit: settled" in stderr, stderr
        info = market_.get_session(session_id)
        # The node settled what was used: the reply's 7 tokens and the prompt's.
        assert info.is_settled and info.output_tokens_paid == 7
        assert 0 < info.input_tokens_paid <= prompt_token_bound(HELLO)
