"""`inferledger dispute open|show|withdraw` against a cheating scripted host on anvil, with
three jurors in this process: the challenger's commands slash the host and pay out, and
bad input gets one line that names the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from dispute_support import (
    SCRIPTED,
    CheatingScripted,
    scripted_clients,
    scripted_session,
    start_in_process_jury,
)
from process_support import needs_rpc
from typer.testing import CliRunner

from inferledger.chain.devchain import DevWorld, dev_account
from inferledger.chain.units import format_usdc
from inferledger.cli.main import app
from inferledger.sdk.disputes import find_bundle


def _run(world: DevWorld, deployment: Path, *args: str, key: bool = True) -> tuple[int, str]:
    env = {"INFERLEDGER_KEY": "0x" + dev_account("challenger").key.hex() if key else ""}
    result = CliRunner().invoke(
        app,
        ["dispute", *args, "--rpc", world.chain.url, "--deployment", str(deployment)],
        env=env,
    )
    return result.exit_code, result.output


def test_the_dispute_commands_slash_a_cheater_and_pay_the_challenger(
    world: DevWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    needs_rpc(world, "the CLI connects to chain_url")
    monkeypatch.setenv("INFERLEDGER_HOME", str(tmp_path / "home"))
    c = world.contracts
    deployment = tmp_path / "deployment.json"
    c.deployment.save(deployment)
    user, challenger = scripted_clients(world, tmp_path)
    jury = start_in_process_jury(world, SCRIPTED, 3)
    try:
        with scripted_session(world, user, CheatingScripted(), tmp_path / "node") as record:
            find_bundle(record, 1)  # the node still serves it: `dispute open` fetches it
            record_file = tmp_path / "record.json"
            record_file.write_text(record.model_dump_json())

            def open_dispute(
                checkpoint: int, path: Path, *extra: str, key: bool = True
            ) -> tuple[int, str]:
                """`dispute open` on the session, from the record at ``path``."""
                args = ["open", str(record.session_id), "--checkpoint", str(checkpoint)]
                return _run(world, deployment, *args, "--record", str(path), *extra, key=key)

            code, output = open_dispute(1, record_file, key=False)
            assert code == 1 and "INFERLEDGER_KEY is not set" in output, output
            bad = tmp_path / "bad.json"
            bad.write_text("{")
            code, output = open_dispute(1, bad)
            assert code == 1 and "not a session record" in output, output
            code, output = open_dispute(9, record_file)
            assert code == 1 and "has no checkpoint 9" in output, output
            assert c.disputes.dispute_count() == 0  # nothing opened, no bond taken

            stake = c.nodes.get_host(world.host.address).stake
            code, output = open_dispute(1, record_file, "--wait", "120")
        assert code == 0, output
        assert "dispute 1 opened" in output and "took the evidence" in output, output
        assert "FRAUD, the host was slashed" in output, output
        assert c.nodes.get_host(world.host.address).stake < stake

        code, output = _run(world, deployment, "show", "1")
        assert code == 0 and "resolved: FRAUD" in output, output
        code, output = _run(world, deployment, "show", "7")
        assert code == 1 and "no dispute 7" in output, output

        credit = challenger.disputes.credit()
        balance = c.token.balance_of(challenger.address)
        # Its bond back with the slash, less the depositor's refund and the jurors' fees.
        info = challenger.disputes.show(1)
        paid = c.marketplace.dispute_facts(record.session_id).paid
        slashed = stake - c.nodes.get_host(world.host.address).stake
        assert slashed == paid * c.disputes.penalty_bps() // 10_000
        fees = info.votes_fraud * c.disputes.verifier_fee()
        assert credit == slashed + c.disputes.bond() - paid - fees
        code, output = _run(world, deployment, "withdraw")
        assert code == 0 and f"withdrew {format_usdc(credit)} USDC" in output, output
        assert c.token.balance_of(challenger.address) == balance + credit
        code, output = _run(world, deployment, "withdraw")
        assert code == 1 and "no dispute credit" in output, output
    finally:
        jury.stop()
