"""The juror service on both chains, with the scripted backend (fast): evidence only from
the dispute, only to its jurors; a cheating host slashed, an honest one not; the metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from dispute_support import (
    SCRIPTED,
    CheatingScripted,
    scripted_clients,
    scripted_session,
    start_in_process_jury,
)

from inferledger.chain.contracts import DISPUTE_RESOLVED
from inferledger.chain.devchain import DevWorld
from inferledger.sdk.disputes import find_bundle, transcript_of


@pytest.mark.parametrize("cheat", [False, True], ids=["honest", "cheating"])
def test_jurors_judge_a_scripted_host(world: DevWorld, tmp_path: Path, cheat: bool) -> None:
    user, challenger = scripted_clients(world, tmp_path)
    jury = start_in_process_jury(world, SCRIPTED, 3)
    try:
        backend = CheatingScripted() if cheat else SCRIPTED
        with scripted_session(world, user, backend, tmp_path / "node") as record:
            bundle = find_bundle(record, 1)
        c = world.contracts
        stake = c.nodes.get_host(world.host.address).stake
        # The host is gone by now: the challenger kept the bundle it fetched.
        dispute_id = challenger.disputes.open(record, 1, bundle)
        challenger.disputes.draw(dispute_id)
        assert all(d.ok for d in challenger.disputes.deliver(dispute_id, record, bundle))
        info = challenger.disputes.wait(dispute_id, timeout=120)
        assert (info.status, info.fraud) == (DISPUTE_RESOLVED, cheat)
        host_amount, fee = c.marketplace.paid_of(record.session_id)
        if cheat:
            slash = (host_amount + fee) * c.disputes.penalty_bps() // 10_000
            assert c.nodes.get_host(world.host.address).stake == stake - slash
            assert c.disputes.credit(record.depositor) == host_amount + fee
        else:
            assert c.nodes.get_host(world.host.address).stake == stake
            assert c.disputes.credit(challenger.address) == 0
        verdicts = sum(
            _metric(server.url, "inferledger_verifier_verdicts_total") for server in jury.servers
        )
        assert verdicts == info.votes_fraud + info.votes_honest
    finally:
        jury.stop()


def test_evidence_is_taken_only_from_the_dispute_and_only_by_its_jurors(
    world: DevWorld, tmp_path: Path
) -> None:
    user, challenger = scripted_clients(world, tmp_path)
    jury = start_in_process_jury(world, SCRIPTED, 4)
    try:
        with scripted_session(world, user, SCRIPTED, tmp_path / "node") as record:
            bundle = find_bundle(record, 1)
        dispute_id = challenger.disputes.open(record, 1, bundle)
        jurors = challenger.disputes.draw(dispute_id)
        pairs = zip(jury.services, jury.servers, strict=True)
        urls = {service.address: server.url for service, server in pairs}
        (outsider,) = [who for who in urls if who not in jurors]
        good = {
            "bundle": "0x" + bundle.encode().hex(),
            "transcript": "0x" + transcript_of(record).encode().hex(),
        }
        forged = transcript_of(record).model_copy(update={"salt": "0x" + "11" * 32})

        def post(who: str, body: Any, dispute: int = dispute_id) -> httpx.Response:
            return httpx.post(f"{urls[who]}/v1/disputes/{dispute}/evidence", json=body, timeout=30)

        juror = jurors[0]
        assert post(outsider, good).status_code == 403  # the transcript stays with the jury
        assert post(juror, good, dispute=dispute_id + 1).status_code == 404
        assert post(juror, {"bundle": "0x00"}).status_code == 400
        assert post(juror, "not an object").status_code == 400
        wrong = {**good, "transcript": "0x" + forged.encode().hex()}
        response = post(juror, wrong)
        assert response.status_code == 422 and "commitment" in response.json()["message"]
        assert post(juror, good).status_code == 200
        assert all(d.ok for d in challenger.disputes.deliver(dispute_id, record, bundle))
        info = challenger.disputes.wait(dispute_id, timeout=120)
        assert info.status == DISPUTE_RESOLVED and not info.fraud
        # Decided: a juror refuses more evidence, and the challenger's delivery says it was
        # not needed rather than failed (the others' votes came first).
        assert post(juror, good).status_code == 409
        late = challenger.disputes.deliver(dispute_id, record, bundle)
        assert late and all(d.ok and d.late for d in late), late
    finally:
        jury.stop()


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )
