"""Disputes end to end: a real SmolLM2 host, a challenger holding the transcript, staked
jurors that re-run the model. A cheating host (noisy weights, an edited token, text forged
by a prefill) is slashed and the depositor made whole; an honest host disputed 20 times
never is, and the challenger loses its bonds; a dispute after the window is refused; jurors
that stay silent are replaced and lose part of their stake.

The embedded chain runs the jurors in this process; anvil runs `inferledger verifier run`
processes (five for the silent jurors; three for edits, forgeries and an honest host).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dispute_support import (
    EditingBackend,
    PrefillForgingBackend,
    host_node,
    run_session,
    start_in_process_jury,
    start_process_jury,
)
from model_edits import perturbed

from inferledger.chain.connect import connect
from inferledger.chain.contracts import DISPUTE_RESOLVED, Contracts
from inferledger.chain.devchain import INPUT_PRICE, PRICE, DevWorld, build_dev_world, dev_account
from inferledger.chain.errors import ContractRevert
from inferledger.chain.units import usdc
from inferledger.inference import GenerationParams
from inferledger.inference.base import Token
from inferledger.sdk import Client, SessionRecord
from inferledger.sdk.errors import SdkError

STORY = "Tell me a long story about a lighthouse keeper and a storm."
OTHER = "Explain how tides work, step by step."
BONDS = usdc("200")


class Serialised:
    """The shared SmolLM2 behind a lock: the in-process jurors judge on their own threads."""

    def __init__(self, inner: Any) -> None:
        self._inner, self._lock = inner, threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def locked(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)

        return locked


@contextmanager
def noisy(smollm: Any, relative: float = 0.02) -> Iterator[None]:
    """The host serves another model while this lasts: noise on every MLP output weight."""
    weights = [layer.mlp.down_proj.weight for layer in smollm._model.model.layers]
    with perturbed(weights, relative, seed=1):
        yield


@dataclass
class Stage:
    """One chain, a SmolLM2 model approved for the world's host, a challenger's client."""

    world: DevWorld
    model_id: bytes
    user: Client
    challenger: Client
    tmp: Path

    @property
    def c(self) -> Contracts:
        return self.world.contracts


def build_stage(chain_url: str | None, smollm: Any, tmp: Path) -> Stage:
    chain = connect(chain_url) if chain_url else connect()
    world = build_dev_world(chain, host_stake=usdc("50"))  # room for every session
    c = world.contracts
    model_id = c.models.approve_model(
        world.owner, smollm.name, bytes.fromhex(smollm.weights_sha256)
    )
    # The dev prices, $0.0005 a prompt token and $0.002 a reply token: a session pays
    # enough for the slash (twice that) to show.
    c.nodes.set_models(world.host, {model_id: (INPUT_PRICE, PRICE)})
    challenger = world.funded_sender("challenger", BONDS)
    user = Client(
        chain,
        key="0x" + dev_account("user").key.hex(),
        deployment=c.deployment,
        sessions_dir=tmp / "user",
    )
    challenger_client = Client(
        chain,
        key="0x" + dev_account("challenger").key.hex(),
        deployment=c.deployment,
        sessions_dir=tmp / "challenger",
    )
    assert challenger_client.address == challenger.address
    return Stage(world, model_id, user, challenger_client, tmp)


def dispute(stage: Stage, record: SessionRecord, checkpoint: int) -> Any:
    """Open, draw, deliver to every juror, and follow to the verdict."""
    disputes = stage.challenger.disputes
    dispute_id = disputes.open(record, checkpoint)
    disputes.draw(dispute_id)
    deliveries = disputes.deliver(dispute_id, record)
    assert all(d.ok for d in deliveries), deliveries
    return dispute_id, disputes.wait(dispute_id, timeout=300)


def paid_total(c: Contracts, session_id: int) -> int:
    return c.marketplace.dispute_facts(session_id).paid


def assert_slashed(stage: Stage, record: SessionRecord, run: Any) -> None:
    """The dispute found fraud; the host lost what the rules say, and each party got its
    share: the depositor what it paid, each majority juror its fee, the challenger the rest
    (its bond and a reward)."""
    c = stage.c
    host = stage.world.host.address
    stake_before = c.nodes.get_host(host).stake
    credits = {who: c.disputes.credit(who) for who in (record.depositor, stage.challenger.address)}
    _, info = run()
    assert (info.status, info.fraud) == (DISPUTE_RESOLVED, True), info
    paid = paid_total(c, record.session_id)
    slashed = min(stake_before, paid * c.disputes.penalty_bps() // 10_000)
    assert c.nodes.get_host(host).stake == stake_before - slashed
    assert c.disputes.credit(record.depositor) - credits[record.depositor] == paid
    fees = info.votes_fraud * c.disputes.verifier_fee()
    reward = slashed + c.disputes.bond() - paid - fees
    assert paid > 0 and reward > 0
    assert c.disputes.credit(stage.challenger.address) - credits[stage.challenger.address] == (
        reward
    )
    with pytest.raises(SdkError, match="fraud"):  # judged once: not disputed again
        stage.challenger.disputes.open(record, info.checkpoint_index)


# The embedded chain, jurors in this process ---------------------------------------------


@pytest.fixture(scope="module")
def embedded(smollm: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    tmp = tmp_path_factory.mktemp("disputes")
    stage = build_stage(None, smollm, tmp)
    jury = start_in_process_jury(stage.world, Serialised(smollm), 3)
    try:
        yield stage
    finally:
        jury.stop()


def test_a_host_serving_noisy_weights_is_slashed_and_the_depositor_made_whole(
    embedded: Stage, smollm: Any
) -> None:
    with host_node(embedded.world, smollm, embedded.tmp / "noisy"):
        record = run_session(
            embedded.user,
            embedded.world,
            embedded.model_id,
            [STORY],
            max_tokens=30,
            during=lambda: noisy(smollm),
        )
        assert_slashed(embedded, record, lambda: dispute(embedded, record, 1))


def test_a_host_that_edits_a_token_is_slashed(embedded: Stage, smollm: Any) -> None:
    with host_node(embedded.world, EditingBackend(smollm, at=4), embedded.tmp / "edit"):
        record = run_session(
            embedded.user, embedded.world, embedded.model_id, [STORY], max_tokens=30
        )
        assert_slashed(embedded, record, lambda: dispute(embedded, record, 1))


def test_a_host_that_forges_text_by_prefill_is_slashed(embedded: Stage, smollm: Any) -> None:
    params = GenerationParams(max_tokens=30, temperature=0)
    other = [
        e.token_id
        for e in smollm.generate([{"role": "user", "content": OTHER}], params)
        if isinstance(e, Token)
    ]
    with host_node(embedded.world, PrefillForgingBackend(smollm, other), embedded.tmp / "forge"):
        record = run_session(
            embedded.user, embedded.world, embedded.model_id, [STORY], max_tokens=30
        )
        assert_slashed(embedded, record, lambda: dispute(embedded, record, 1))


def test_an_honest_host_disputed_20_times_is_never_slashed(embedded: Stage, smollm: Any) -> None:
    c = embedded.c
    host = embedded.world.host.address
    with host_node(embedded.world, smollm, embedded.tmp / "honest"):
        records = [
            run_session(
                embedded.user,
                embedded.world,
                embedded.model_id,
                [q],
                max_tokens=100,
                proof_interval=10,
            )
            for q in (STORY, OTHER)
        ]
        stake = c.nodes.get_host(host).stake
        host_credit = c.disputes.credit(host)
        challenger_credit = c.disputes.credit(embedded.challenger.address)
        balance = c.token.balance_of(embedded.challenger.address)
        opened = majorities = 0
        for record in records:
            bundles = sorted({bundle.checkpoint_index for bundle in _bundles(record)})
            for index in bundles:
                if opened == 20:
                    break
                _, info = dispute(embedded, record, index)
                assert (info.status, info.fraud) == (DISPUTE_RESOLVED, False), info
                assert info.votes_fraud == 0  # no juror found fraud, not even a minority
                majorities += info.votes_honest
                opened += 1
    assert opened == 20, f"only {opened} checkpoints: SmolLM2 stopped early"
    bond = c.disputes.bond()
    assert c.nodes.get_host(host).stake == stake
    assert c.token.balance_of(embedded.challenger.address) == balance - 20 * bond
    assert c.disputes.credit(embedded.challenger.address) == challenger_credit
    fees = majorities * c.disputes.verifier_fee()  # the jurors whose votes made each majority
    assert c.disputes.credit(host) - host_credit == 20 * bond - fees


def _bundles(record: SessionRecord) -> list[Any]:
    from inferledger.sdk.verification import checkpoints, fetch_bundle

    return [fetch_bundle(point) for point in checkpoints(record)]


def test_a_dispute_after_the_window_is_refused(embedded: Stage, smollm: Any) -> None:
    with host_node(embedded.world, smollm, embedded.tmp / "late"):
        record = run_session(
            embedded.user, embedded.world, embedded.model_id, [STORY], max_tokens=20
        )
        c, host = embedded.c, embedded.world.host.address
        exposure = c.nodes.get_host(host).exposure
        embedded.world.chain.time_travel(c.disputes.dispute_window() + 10)
        bond_before = c.token.balance_of(embedded.challenger.address)
        with pytest.raises(SdkError, match="dispute window has passed"):
            embedded.challenger.disputes.open(record, 1)
        assert c.token.balance_of(embedded.challenger.address) == bond_before
        # ...and the host's node gives the session's paid amount back to its cap.
        poll(lambda: c.disputes.is_released(record.session_id), "release by the host's node")
    released = exposure - c.nodes.get_host(host).exposure
    assert released == paid_total(c, record.session_id)


# anvil, five `inferledger verifier run` processes -----------------------------------------


def test_juror_processes_slash_a_cheater_and_replace_silent_jurors(
    anvil_url: str, smollm: Any, tmp_path: Path
) -> None:
    stage = build_stage(anvil_url, smollm, tmp_path)
    c = stage.c
    deployment = tmp_path / "deployment.json"
    c.deployment.save(deployment)
    jury = start_process_jury(stage.world, deployment, 5, tmp_path)
    try:
        with host_node(stage.world, smollm, tmp_path / "node"):
            record = run_session(
                stage.user,
                stage.world,
                stage.model_id,
                [STORY],
                max_tokens=30,
                during=lambda: noisy(smollm),
            )

            def silenced() -> Any:
                disputes = stage.challenger.disputes
                dispute_id = disputes.open(record, 1)
                first = disputes.draw(dispute_id)
                silent = first[:2]
                stakes = {who: c.verifiers.get_verifier(who).stake for who in silent}
                for who in silent:
                    jury.stop(who)
                disputes.deliver(dispute_id, record)  # the live juror votes; no majority
                poll(lambda: c.disputes.has_voted(dispute_id, first[2]), "the live juror's vote")
                stage.world.chain.time_travel(c.disputes.verdict_period() + 5)
                # Anyone may replace them: the live juror's own loop may be first.
                try:
                    c.disputes.replace_silent(stage.challenger.sender, dispute_id)
                except ContractRevert as exc:
                    assert "no silent juror" in str(exc) or "not drawn" in str(exc), exc
                poll(
                    lambda: not set(silent) & set(c.disputes.get_dispute(dispute_id).seated),
                    "the replacement",
                )
                seated = disputes.draw(dispute_id)
                assert not set(silent) & set(seated) and first[2] in seated
                deliveries = disputes.deliver(dispute_id, record)
                assert all(d.ok for d in deliveries), deliveries
                info = disputes.wait(dispute_id, timeout=300)
                for who in silent:
                    after = c.verifiers.get_verifier(who)
                    assert after.stake == stakes[who] - c.disputes.silent_penalty()
                    assert after.assignments == 0
                return dispute_id, info

            assert_slashed_with_penalties(stage, record, silenced)
    finally:
        jury.stop()


def poll(done: Any, what: str, bound: float = 300.0) -> None:
    """Wait for ``done()`` (a juror process acting), at most ``bound`` seconds."""
    deadline = time.monotonic() + bound
    while not done():
        assert time.monotonic() < deadline, f"no {what} within {bound:.0f} s"
        time.sleep(0.2)


def assert_slashed_with_penalties(stage: Stage, record: SessionRecord, run: Any) -> None:
    """As :func:`assert_slashed`, with the silent jurors' penalties in the challenger's pot."""
    c = stage.c
    stake_before = c.nodes.get_host(stage.world.host.address).stake
    before = c.disputes.credit(stage.challenger.address)
    _, info = run()
    assert (info.status, info.fraud) == (DISPUTE_RESOLVED, True), info
    paid = paid_total(c, record.session_id)
    slashed = min(stake_before, paid * c.disputes.penalty_bps() // 10_000)
    assert c.nodes.get_host(stage.world.host.address).stake == stake_before - slashed
    fees = info.votes_fraud * c.disputes.verifier_fee()
    # Every juror who judged found fraud: a replacement that once voted "no fraud" here
    # had read its seat and the jury's deadline at two blocks (see Disputes.get_dispute).
    assert info.votes_honest == 0, info
    penalties = 2 * c.disputes.silent_penalty()
    assert c.disputes.credit(stage.challenger.address) - before == (
        slashed + c.disputes.bond() + penalties - paid - fees
    )


def test_juror_processes_slash_edits_and_forgeries_and_acquit_an_honest_host(
    anvil_url: str, smollm: Any, tmp_path: Path
) -> None:
    """The other two cheats, and an honest host, judged by three `inferledger verifier run`
    processes on anvil (every juror sits on every dispute). The jurors run torch with its
    default thread count, the host with one: an honest host still passes."""
    stage = build_stage(anvil_url, smollm, tmp_path)
    deployment = tmp_path / "deployment.json"
    stage.c.deployment.save(deployment)
    params = GenerationParams(max_tokens=30, temperature=0)
    other = [
        e.token_id
        for e in smollm.generate([{"role": "user", "content": OTHER}], params)
        if isinstance(e, Token)
    ]
    cheats = {"edit": EditingBackend(smollm, at=4), "forge": PrefillForgingBackend(smollm, other)}
    jury = start_process_jury(stage.world, deployment, 3, tmp_path)
    try:
        for name, backend in cheats.items():
            with host_node(stage.world, backend, tmp_path / name):
                record = run_session(
                    stage.user, stage.world, stage.model_id, [STORY], max_tokens=30
                )
                assert_slashed(stage, record, lambda record=record: dispute(stage, record, 1))
        c, host = stage.c, stage.world.host.address
        with host_node(stage.world, smollm, tmp_path / "honest"):
            record = run_session(stage.user, stage.world, stage.model_id, [OTHER], max_tokens=60)
            stake = c.nodes.get_host(host).stake
            for index in sorted({bundle.checkpoint_index for bundle in _bundles(record)}):
                _, info = dispute(stage, record, index)
                assert (info.status, info.fraud, info.votes_fraud) == (DISPUTE_RESOLVED, False, 0)
        assert index >= 5, "SmolLM2 stopped early: too few checkpoints disputed"
        assert c.nodes.get_host(host).stake == stake
    finally:
        jury.stop()
