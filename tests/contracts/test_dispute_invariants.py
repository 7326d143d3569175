"""Stateful invariants of the dispute game, on both chains: every token unit accounted for.

Hypothesis drives random histories of settled sessions, disputes opened on them (valid,
forged, late, on a session already judged), jury draws, relayed verdicts (from jurors,
outsiders and jurors voting twice), silent jurors replaced, juries that cannot be seated
cancelled, exposure released, credits withdrawn, verifiers leaving and coming back, hosts
topping up a slashed stake, and time travel, over two hosts, two depositors, two outside
challengers and five verifiers. A Python model predicts every outcome (which calls must
revert, and why; who is credited what) and after every step the chain is checked:

- conservation: the token's total supply is exactly the sum of every balance the model
  knows (wallets and contracts), and each contract holds exactly what it owes: the
  NodeRegistry the hosts' stakes, the VerifierRegistry the verifiers' stakes, the
  DisputeManager the credits plus the bonds and penalties of open disputes, the
  marketplace its treasury, HostEarnings the hosts' earnings;
- every wallet, stake, exposure, credit, seat and vote matches the model;
- a host's exposure never passes its cap (so a slash always covers it), and every fraud
  finding credits the depositor exactly what the session paid.

Block timestamps follow the wall clock, so the model knows the next block's time only to
within ``SLACK`` seconds; inside that band a time-dependent call may go either way. Which
way it went is state, so no rule has a precondition on it (hypothesis replays a failing
history and needs the same rules enabled each time): the initial step makes sessions and
a dispute exist, and a rule with nothing to act on returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from eth_account import Account
from eth_utils import keccak
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from inferledger.chain.contracts import DISPUTE_CANCELLED, DISPUTE_OPEN, DISPUTE_RESOLVED
from inferledger.chain.devchain import DevWorld, sign
from inferledger.chain.errors import ContractRevert
from inferledger.chain.receipts import sign_verdict
from inferledger.chain.tx import TxSender
from inferledger.chain.units import MTOK, cost, settlement_split, usdc
from support import URI, VERIFIER_STAKE, machine_settings

T = TypeVar("T")

SLACK = 15
BPS = 10_000
MAX_UINT = 2**256 - 1
FUNDS = usdc(500)
VERIFIERS = 5
MAX_SESSIONS = 8
MAX_EXAMPLES = 12
STEPS = 35
COMMITMENT = b"\x07" * 32

DM = "DisputeManager: "
VR = "VerifierRegistry: "

selector = st.integers(min_value=0, max_value=2**16)
# Fraud and no fraud each with a minority juror, unanimous, and with silent jurors.
OPENING_BALLOTS = [
    (True, False, True),
    (False, True, False),
    (True, True, None),
    (False, False, None),
    (True, None, None),
    (None, None, None),
]


@dataclass
class World:
    """The dev world with the extra accounts a dispute history needs, and its snapshot."""

    world: DevWorld
    hosts: list[TxSender]
    users: list[TxSender]
    challengers: list[TxSender]
    verifiers: list[TxSender]
    snapshot: Any


@pytest.fixture
def dispute_world(world: DevWorld) -> World:
    c = world.contracts
    hosts = [world.host]
    extra = world.funded_sender("dm-host-1", FUNDS)
    stake = c.deployment.params.min_stake
    c.token.approve(extra, c.nodes.address, MAX_UINT)
    prices = c.nodes.prices_of(world.host.address, world.model_id)
    c.nodes.register(extra, "ws://dm-host-1.invalid", {world.model_id: prices}, stake)
    hosts.append(extra)
    c.token.mint(world.host, world.host.address, FUNDS)
    c.token.approve(world.host, c.nodes.address, MAX_UINT)
    users = [world.user, world.funded_sender("dm-user-1")]
    challengers = [world.funded_sender(f"dm-challenger-{i}", FUNDS) for i in (0, 1)]
    for sender in users:
        c.token.mint(sender, sender.address, FUNDS)
    for sender in [*users, *challengers, *hosts]:
        c.token.approve(sender, c.disputes.address, MAX_UINT)
    for sender in users:
        c.token.approve(sender, c.marketplace.address, MAX_UINT)
    verifiers = []
    for i in range(VERIFIERS):
        verifier = world.funded_sender(f"dm-verifier-{i}", FUNDS)
        c.token.approve(verifier, c.verifiers.address, MAX_UINT)
        c.verifiers.register(verifier, f"http://127.0.0.1:{9100 + i}", VERIFIER_STAKE)
        verifiers.append(verifier)
    return World(world, hosts, users, challengers, verifiers, world.chain.snapshot())


@dataclass
class ModelSession:
    sid: int
    host: int
    depositor: str
    paid: int
    settled_at: int
    released: bool = False
    fraudulent: bool = False
    dispute: int = 0  # the open dispute on it


@dataclass
class ModelDispute:
    did: int
    sid: int
    challenger: str
    bond: int
    draw_block: int
    empty_since: int
    seats: list[str | None]
    status: int = DISPUTE_OPEN
    deadline: int = 0
    fraud: bool = False
    penalties: int = 0
    sat: set[str] = field(default_factory=set)
    votes: dict[str, bool] = field(default_factory=dict)


@dataclass
class ModelVerifier:
    stake: int
    registered: bool = True
    unbonding_ends_at: int = 0
    assignments: int = 0


@dataclass
class ModelHost:
    stake: int
    exposure: int = 0
    earned: int = 0


class DisputeMachine(RuleBasedStateMachine):
    def __init__(self, w: World) -> None:
        super().__init__()
        self.w = w
        self.world = w.world
        self.chain = w.world.chain
        self.c = w.world.contracts
        self.chain.revert(w.snapshot)
        w.snapshot = self.chain.snapshot()  # anvil reverts to a snapshot only once
        self.chain.mine()
        d, p = self.c.disputes, self.c.deployment.params
        self.window, self.period, self.jury = d.dispute_window(), d.verdict_period(), d.jury_size()
        self.bond, self.fee = d.bond(), d.verifier_fee()
        self.penalty_bps, self.silent, self.minority = (
            d.penalty_bps(),
            d.silent_penalty(),
            d.minority_penalty(),
        )
        self.exposure_bps, self.host_min = p.exposure_bps, p.min_stake
        self.verifier_min, self.unbonding = self.c.verifiers.min_stake(), p.unbonding_delay
        self.fee_bps = self.c.marketplace.fee_bps()
        self.domain = d.domain()
        self.sessions: dict[int, ModelSession] = {}
        self.disputes: dict[int, ModelDispute] = {}
        self.hosts = {h.address: ModelHost(self.c.nodes.get_host(h.address).stake) for h in w.hosts}
        self.verifiers = {v.address: ModelVerifier(VERIFIER_STAKE) for v in w.verifiers}
        self.senders = {s.address: s for s in [*w.hosts, *w.users, *w.challengers, *w.verifiers]}
        self.credit = dict.fromkeys(self.senders, 0)
        self.treasury = self.read(self.c.marketplace, "treasury_balance")
        holders = [*self.senders, self.world.owner.address, self.c.deployment.treasury]
        self.wallet = {a: self.balance(a) for a in holders}
        self.supply = self.read(self.c.token, "totalSupply")
        # Tokens minted to accounts no rule touches: a constant, or a unit went astray.
        known = [*self.wallet, *self.contract_balances()]
        self.outside = self.supply - sum(self.balance(a) for a in known)
        self.checked_block = -1

    # Helpers --------------------------------------------------------------------------

    def timing(self, deadline: int) -> str:
        """Whether the next transaction is surely at or "before" the deadline, "after" it.

        A block mined first pins the latest timestamp to the clock: a busy machine may have
        spent longer than ``SLACK`` since the last one.
        """
        self.chain.mine()
        now = self.chain.now()
        if now + SLACK <= deadline:
            return "before"
        if now > deadline:
            return "after"
        return "unknown"

    def block_time(self, receipt: Any) -> int:
        return int(self.chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"])

    def attempt(self, call: Callable[[], T], reasons: list[str], may_succeed: bool) -> T | None:
        """Run ``call``; a revert must carry one of ``reasons``; success must be allowed."""
        try:
            result = call()
        except ContractRevert as exc:
            event(f"revert: {exc.reason.split(': ', 1)[-1]}")
            assert any(r in exc.reason for r in reasons), (
                f"unexpected revert {exc.reason!r}; expected one of {reasons}"
                + (" or success" if may_succeed else "")
            )
            return None
        assert may_succeed, f"call succeeded but should have reverted with one of {reasons}"
        return result

    def pick_session(self, index: int) -> ModelSession:
        ids = sorted(self.sessions)
        return self.sessions[ids[index % len(ids)]]

    def pick_dispute(
        self, index: int, want: Callable[[ModelDispute], bool] = lambda d: True
    ) -> ModelDispute:
        """Mostly an open dispute the rule can act on (``want``); one time in five any."""
        ids = sorted(i for i, d in self.disputes.items() if d.status == DISPUTE_OPEN and want(d))
        if not ids or index % 5 == 0:
            ids = sorted(self.disputes)
        return self.disputes[ids[(index // 5) % len(ids)]]

    def verifier_active(self, address: str) -> bool:
        v = self.verifiers[address]
        return v.registered and v.unbonding_ends_at == 0 and v.stake >= self.verifier_min

    def host_of(self, s: ModelSession) -> TxSender:
        return self.w.hosts[s.host]

    def penalize(self, address: str, amount: int) -> int:
        v = self.verifiers[address]
        taken = min(amount, v.stake)
        v.stake -= taken
        return taken

    @initialize(
        share=st.integers(0, 100),
        who=st.sampled_from(["challenger", "depositor"]),
        ballots=st.sampled_from(OPENING_BALLOTS),
    )
    def a_disputed_session(self, share: int, who: str, ballots: tuple[bool | None, ...]) -> None:
        """Every history starts with a settled session of each host, the first disputed,
        its jury drawn and voting one of the splits that matter (a minority, silence)."""
        self.settle_session(0, 0, usdc(1), share)
        self.settle_session(1, 1, usdc(2), 100 - share)
        self.open_dispute(0, who, "valid")
        self.draw_jury(self.disputes[1], share)
        for seat, ballot in enumerate(ballots):
            if ballot is not None:
                self.verdict(0, seat, ballot, "juror", seated=self.disputes[1].seats[seat])

    # Sessions ---------------------------------------------------------------------------

    @rule(
        host=st.integers(0, 1),
        user=st.integers(0, 1),
        deposit=st.sampled_from([usdc("0.5"), usdc(1), usdc(2)]),
        share=st.integers(0, 100),
    )
    def settle_session(self, host: int, user: int, deposit: int, share: int) -> None:
        """A session opened and completed at once: its paid amount is what disputes judge."""
        if len(self.sessions) >= MAX_SESSIONS:  # (a precondition would be flaky: see the docstring)
            return
        host_sender, user_sender = self.w.hosts[host], self.w.users[user]
        model_host = self.hosts[host_sender.address]
        in_price, out_price = self.c.nodes.prices_of(host_sender.address, self.world.model_id)
        if model_host.stake < self.host_min:
            reasons = ["JobMarketplace: host not active"]
        elif (model_host.exposure + deposit) * BPS > model_host.stake * self.exposure_bps:
            reasons = ["NodeRegistry: host exposure above its stake cap"]
        else:
            reasons = []
        signer = Account.create()
        sid = self.attempt(
            lambda: self.c.marketplace.create_session(
                user_sender,
                host=host_sender.address,
                model_id=self.world.model_id,
                deposit=deposit,
                max_input_price_per_mtok=in_price,
                max_output_price_per_mtok=out_price,
                max_duration=86400,
                proof_interval=10,
                session_signer=signer.address,
            ),
            reasons,
            not reasons,
        )
        if sid is None:
            return
        self.wallet[user_sender.address] -= deposit
        model_host.exposure += deposit
        # 20 prompt tokens, and ``share`` percent of the output tokens the rest buys.
        room = (deposit - cost(20, 0, in_price, out_price)) * share // 100
        tokens = (20, room * MTOK // out_price)
        proof = keccak(text=f"proof:{sid}")
        signature = sign(self.world, signer, sid, *tokens, proof)
        event = self.c.marketplace.complete_session(
            host_sender, sid, *tokens, proof, URI, signature
        )
        split = settlement_split(deposit, *tokens, in_price, out_price, self.fee_bps)
        assert (event.host_amount, event.fee, event.refund) == (split.host, split.fee, split.refund)
        paid = split.host + split.fee
        model_host.exposure -= deposit - paid
        model_host.earned += split.host
        self.treasury += split.fee
        self.wallet[user_sender.address] += split.refund
        settled_at = self.block_time(self.chain.w3.eth.get_transaction_receipt(event.tx_hash))
        self.sessions[sid] = ModelSession(sid, host, user_sender.address, paid, settled_at)
        assert self.c.marketplace.dispute_facts(sid).paid == paid

    @rule(index=selector)
    def release_exposure(self, index: int) -> None:
        s = self.pick_session(index)
        when = self.timing(s.settled_at + self.window)
        reasons: list[str] = []
        if when == "before":
            reasons.append(DM + "dispute window still open")
        if s.dispute:
            reasons.append(DM + "a dispute is open on this session")
        elif s.released:
            reasons.append(DM + "exposure already released")
        may_succeed = when != "before" and not s.dispute and not s.released
        if when == "unknown":
            reasons.append(DM + "dispute window still open")
        caller = self.w.challengers[index % 2]
        receipt = self.attempt(
            lambda: self.c.disputes.release_exposure(caller, s.sid), reasons, may_succeed
        )
        if receipt is None:
            return
        assert self.block_time(receipt) > s.settled_at + self.window
        s.released = True
        self.hosts[self.host_of(s).address].exposure -= s.paid

    @rule(host=st.integers(0, 1), amount=st.sampled_from([usdc(1), usdc(5), usdc(20)]))
    def host_tops_up(self, host: int, amount: int) -> None:
        """A host adds stake (after a slash, to be active again)."""
        sender = self.w.hosts[host]
        self.c.nodes.add_stake(sender, amount)
        self.hosts[sender.address].stake += amount
        self.wallet[sender.address] -= amount

    # Disputes ---------------------------------------------------------------------------

    @rule(
        index=selector,
        who=st.sampled_from(["challenger", "challenger", "depositor", "host"]),
        kind=st.sampled_from(["valid"] * 6 + ["forged", "other_hash", "checkpoint_0"]),
    )
    def open_dispute(self, index: int, who: str, kind: str) -> None:
        s = self.pick_session(index)
        host = self.host_of(s)
        if who == "challenger":
            challenger = self.w.challengers[index % 2]
        elif who == "depositor":
            challenger = self.senders[s.depositor]
        else:  # a host disputing another host's session (or its own: nothing forbids it)
            challenger = self.w.hosts[(s.host + index) % 2]
        bundle_hash = keccak(text=f"bundle:{s.sid}:{index}")
        signer = challenger if kind == "forged" else host
        signed = bundle_hash if kind != "other_hash" else keccak(b"another bundle")
        signature = bytes(Account.unsafe_sign_hash(signed, signer.account.key).signature)
        checkpoint = 0 if kind == "checkpoint_0" else 1 + index % 3
        forged = kind == "other_hash" or (kind == "forged" and signer.address != host.address)
        when = self.timing(s.settled_at + self.window)
        reasons: list[str] = []
        if when != "before":
            reasons.append(DM + "dispute window has passed")
        if when != "after":
            if s.fraudulent:
                reasons.append(DM + "session already found fraudulent")
            elif s.released:
                reasons.append(DM + "dispute window has passed")
            elif s.dispute:
                reasons.append(DM + "a dispute is open on this session")
            elif checkpoint == 0:
                reasons.append(DM + "checkpoints start at 1")
            elif forged:
                reasons.append(DM + "bundle not signed by the session's host")
        may_succeed = when != "after" and not (
            s.fraudulent or s.released or s.dispute or checkpoint == 0 or forged
        )
        did = self.attempt(
            lambda: self.c.disputes.open_dispute(
                challenger, s.sid, checkpoint, bundle_hash, signature, COMMITMENT
            ),
            reasons,
            may_succeed,
        )
        if did is None:
            return
        assert did == len(self.disputes) + 1
        self.wallet[challenger.address] -= self.bond
        s.dispute = did
        self.disputes[did] = ModelDispute(
            did,
            s.sid,
            challenger.address,
            self.bond,
            draw_block=self.chain.block_number(),
            empty_since=self.chain.now(),
            seats=[None] * self.jury,
        )

    @rule(index=selector, caller=st.integers(0, 4))
    def draw(self, index: int, caller: int) -> None:
        self.draw_jury(self.pick_dispute(index, lambda d: None in d.seats), caller)

    def draw_jury(self, d: ModelDispute, caller: int) -> None:
        s = self.sessions[d.sid]
        excluded = {self.host_of(s).address, s.depositor, d.challenger} | d.sat
        eligible = [a for a in self.verifiers if self.verifier_active(a) and a not in excluded]
        empty = [i for i, seat in enumerate(d.seats) if seat is None]
        deferred = self.chain.block_number() + 1 - d.draw_block > 256
        if d.status != DISPUTE_OPEN:
            reasons = [DM + "dispute not open"]
        elif deferred:
            reasons = []
        elif not empty:
            reasons = [DM + "jury already drawn"]
        elif len(eligible) < len(empty):
            reasons = [DM + "not enough verifiers"]
        else:
            reasons = []
        sender = self.w.verifiers[caller % VERIFIERS]
        receipt = self.attempt(lambda: self.c.disputes.draw(sender, d.did), reasons, not reasons)
        if receipt is None:
            return
        if deferred:
            d.draw_block = int(receipt["blockNumber"])
            return
        seats = self.c.disputes.get_dispute(d.did).jurors
        for i, address in enumerate(seats):
            if i in empty:
                assert address in eligible, (address, eligible)  # drawn fairly, not chosen
                assert address not in d.sat
                d.seats[i] = address
                d.sat.add(address)
                self.verifiers[address].assignments += 1
            else:
                assert address == d.seats[i]
        d.deadline = self.block_time(receipt) + self.period

    @rule(
        index=selector,
        seat=st.integers(0, 5),
        fraud=st.booleans(),
        kind=st.sampled_from(["juror"] * 5 + ["outsider", "challenger"]),
    )
    def verdict(
        self, index: int, seat: int, fraud: bool, kind: str, seated: str | None = None
    ) -> None:
        d = self.pick_dispute(index, lambda d: d.deadline != 0)
        if kind == "juror" and d.status == DISPUTE_OPEN and d.deadline == 0:
            return self.draw_jury(d, index)  # no jury yet: a juror's service draws first
        # Mostly a juror who has not voted yet; sometimes one who has.
        waiting = [j for j in d.seats if j is not None and (j not in d.votes or seat == 0)]
        if seated is not None:
            signer = self.senders[seated]
        elif kind == "juror" and waiting:
            signer = self.senders[waiting[index % len(waiting)]]
        elif kind == "challenger":
            signer = self.senders[d.challenger]
        else:
            outsiders = [a for a in self.verifiers if a not in d.seats]
            signer = self.senders[outsiders[index % len(outsiders)]]
        seated = signer.address in d.seats
        when = self.timing(d.deadline)
        reasons: list[str] = []
        if d.status != DISPUTE_OPEN:
            reasons.append(DM + "dispute not open")
        elif d.deadline == 0:
            reasons.append(DM + "jury not drawn")
        else:
            if when != "before":
                reasons.append(DM + "verdict period has passed")
            if when != "after":
                if not seated:
                    reasons.append(DM + "signer is not a juror of this dispute")
                elif signer.address in d.votes:
                    reasons.append(DM + "juror already voted")
        may_succeed = (
            d.status == DISPUTE_OPEN
            and d.deadline != 0
            and when != "after"
            and seated
            and signer.address not in d.votes
        )
        signature = sign_verdict(signer.account.key, self.domain, d.did, fraud)
        relay = self.w.challengers[(index + 1) % 2]  # anyone relays
        receipt = self.attempt(
            lambda: self.c.disputes.submit_verdict(relay, d.did, fraud, signature),
            reasons,
            may_succeed,
        )
        if receipt is None:
            return
        assert self.block_time(receipt) <= d.deadline
        d.votes[signer.address] = fraud
        event("verdict")
        majority = self.jury // 2 + 1
        if sum(1 for v in d.votes.values() if v == fraud) >= majority:
            self.resolve(d, fraud)

    @rule(index=selector, ballots=st.lists(st.sampled_from([True, False, None]), min_size=3))
    def jury_votes(self, index: int, ballots: list[bool | None]) -> None:
        """The seated jurors who have not voted each vote (or stay silent: None), in turn."""
        d = self.pick_dispute(index, lambda d: d.deadline != 0)
        if d.status != DISPUTE_OPEN or d.deadline == 0:
            return self.draw_jury(d, index)
        for seat, ballot in enumerate(ballots[: self.jury]):
            if ballot is not None and d.seats[seat] not in d.votes:
                self.verdict(index, seat, ballot, "juror", seated=d.seats[seat])

    def resolve(self, d: ModelDispute, fraud: bool) -> None:
        """What the contract must have paid out, from the rules in docs/disputes.md."""
        event(f"resolved, fraud={fraud}")
        s = self.sessions[d.sid]
        host = self.hosts[self.host_of(s).address]
        d.status, d.fraud, s.dispute = DISPUTE_RESOLVED, fraud, 0
        slashed = 0
        if fraud:
            s.fraudulent = True
            slashed = min(host.stake, s.paid * self.penalty_bps // BPS)
            if not s.released:
                s.released = True
                host.exposure -= s.paid
            host.stake -= slashed
        penalties = d.penalties
        jurors = [j for j in d.seats if j is not None]
        for juror in jurors:
            self.verifiers[juror].assignments -= 1
            if juror in d.votes and d.votes[juror] != fraud:
                penalties += self.penalize(juror, self.minority)
        pot = slashed + d.bond + penalties
        if fraud:
            to_depositor = min(s.paid, pot)
            assert to_depositor == s.paid, "the slash must make the depositor whole"
            pot -= to_depositor
            self.credit[s.depositor] += to_depositor
        for juror in jurors:
            if d.votes.get(juror) == fraud:
                fee = min(self.fee, pot)
                pot -= fee
                self.credit[juror] += fee
        self.credit[d.challenger if fraud else self.host_of(s).address] += pot

    @rule(index=selector)
    def replace_silent(self, index: int) -> None:
        d = self.pick_dispute(index, lambda d: d.deadline != 0)
        silent = [j for j in d.seats if j is not None and j not in d.votes]
        when = self.timing(d.deadline)
        if d.status != DISPUTE_OPEN:
            reasons, may_succeed = [DM + "dispute not open"], False
        elif d.deadline == 0:
            reasons, may_succeed = [DM + "jury not drawn"], False
        elif when == "before":
            reasons, may_succeed = [DM + "verdict period not over"], False
        elif not silent:
            reasons = [DM + "no silent juror"]
            reasons += [DM + "verdict period not over"] if when == "unknown" else []
            may_succeed = False
        else:
            reasons = [DM + "verdict period not over"] if when == "unknown" else []
            may_succeed = True
        receipt = self.attempt(
            lambda: self.c.disputes.replace_silent(self.w.challengers[index % 2], d.did),
            reasons,
            may_succeed,
        )
        if receipt is None:
            return
        assert self.block_time(receipt) > d.deadline
        for i, juror in enumerate(d.seats):
            if juror is not None and juror in silent:
                d.seats[i] = None
                self.verifiers[juror].assignments -= 1
                d.penalties += self.penalize(juror, self.silent)
        d.draw_block = int(receipt["blockNumber"])
        d.empty_since = self.block_time(receipt)
        d.deadline = 0

    @rule(index=selector)
    def cancel(self, index: int) -> None:
        d = self.pick_dispute(index, lambda d: d.deadline == 0)
        when = self.timing(d.empty_since + self.period)
        if d.status != DISPUTE_OPEN:
            reasons, may_succeed = [DM + "dispute not open"], False
        elif d.deadline != 0:
            reasons, may_succeed = [DM + "the jury is seated"], False
        else:
            reasons = [] if when == "after" else [DM + "the jury may still be drawn"]
            may_succeed = when != "before"
        receipt = self.attempt(
            lambda: self.c.disputes.cancel(self.w.users[index % 2], d.did), reasons, may_succeed
        )
        if receipt is None:
            return
        d.status = DISPUTE_CANCELLED
        self.sessions[d.sid].dispute = 0
        self.credit[d.challenger] += d.bond + d.penalties
        for juror in d.seats:
            if juror is not None:
                self.verifiers[juror].assignments -= 1

    @rule(index=st.integers(0, 15))
    def withdraw_credit(self, index: int) -> None:
        """Someone withdraws their dispute credit; one time in four anyone (maybe owed
        nothing)."""
        owed = [a for a, amount in self.credit.items() if amount]
        pool = owed if owed and index % 4 else list(self.senders)
        address = pool[index % len(pool)]
        amount = self.credit[address]
        reasons = [] if amount else [DM + "nothing to withdraw"]
        receipt = self.attempt(
            lambda: self.c.disputes.withdraw(self.senders[address]), reasons, bool(amount)
        )
        if receipt is not None:
            self.credit[address] = 0
            self.wallet[address] += amount

    # Verifiers --------------------------------------------------------------------------

    @rule(
        index=st.integers(0, VERIFIERS - 1),
        action=st.sampled_from(["unstake", "cancel", "withdraw", "withdraw", "add", "register"]),
    )
    def verifier_acts(self, index: int, action: str) -> None:
        sender = self.w.verifiers[index]
        v = self.verifiers[sender.address]
        registry = self.c.verifiers
        call: Callable[[], Any]
        may_succeed = True
        if action == "unstake":
            if not v.registered:
                reasons = [VR + "not registered"]
            elif v.unbonding_ends_at:
                reasons = [VR + "already unbonding"]
            else:
                reasons = []
            call = lambda: registry.request_unstake(sender)  # noqa: E731
        elif action == "cancel":
            if not v.unbonding_ends_at:
                reasons = [VR + "not unbonding"]
            elif v.stake < self.verifier_min:
                reasons = [VR + "stake below minimum"]
            else:
                reasons = []
            call = lambda: registry.cancel_unstake(sender)  # noqa: E731
        elif action == "withdraw":
            when = self.timing(v.unbonding_ends_at - 1)  # the contract's check is ">="
            if not v.unbonding_ends_at:
                reasons, may_succeed = [VR + "not unbonding"], False
            elif when == "before":
                reasons, may_succeed = [VR + "still unbonding"], False
            elif v.assignments:
                reasons, may_succeed = [VR + "verifier holds a jury seat"], False
                if when == "unknown":
                    reasons.append(VR + "still unbonding")
            else:
                reasons = [VR + "still unbonding"] if when == "unknown" else []
            call = lambda: registry.withdraw_stake(sender)  # noqa: E731
        elif action == "add":
            reasons = [] if v.registered else [VR + "not registered"]
            call = lambda: registry.add_stake(sender, usdc(2))  # noqa: E731
        else:
            reasons = [VR + "already registered"] if v.registered else []
            call = lambda: registry.register(sender, "http://127.0.0.1:9199", VERIFIER_STAKE)  # noqa: E731
        if action != "withdraw":
            may_succeed = not reasons
        receipt = self.attempt(call, reasons, may_succeed)
        if receipt is None:
            return
        if action == "unstake":
            v.unbonding_ends_at = self.block_time(receipt) + self.unbonding
        elif action == "cancel":
            v.unbonding_ends_at = 0
        elif action == "withdraw":
            assert self.block_time(receipt) >= v.unbonding_ends_at
            self.wallet[sender.address] += v.stake
            self.verifiers[sender.address] = ModelVerifier(0, registered=False)
        elif action == "add":
            v.stake += usdc(2)
            self.wallet[sender.address] -= usdc(2)
        else:
            self.verifiers[sender.address] = ModelVerifier(VERIFIER_STAKE)
            self.wallet[sender.address] -= VERIFIER_STAKE

    # Time -------------------------------------------------------------------------------

    @rule(
        seconds=st.sampled_from([30, 30, 30, 600, 600, 3600 + 60, 86400 + 60, 8 * 86400]),
        near=st.one_of(st.none(), selector),
        offset=st.sampled_from([-3 * SLACK, 0, 3 * SLACK]),
    )
    def time_travel(self, seconds: int, near: int | None, offset: int) -> None:
        """Forward, or to right next to a verdict deadline or a dispute window's end."""
        if near is not None and self.disputes:
            d = self.pick_dispute(near)
            target = d.deadline if d.deadline else self.sessions[d.sid].settled_at + self.window
            seconds = target + offset - self.chain.now()
        if seconds > 0:
            self.chain.time_travel(seconds)

    # Invariants -------------------------------------------------------------------------

    def read(self, wrapper: Any, name: str, *args: Any) -> Any:
        return wrapper.contract.functions[name](*args).call({"from": self.world.owner.address})

    def balance(self, address: str) -> int:
        return self.read(self.c.token, "balanceOf", address)

    def contract_balances(self) -> dict[str, int]:
        """What each contract owes, by the model."""
        c = self.c
        open_disputes = [d for d in self.disputes.values() if d.status == DISPUTE_OPEN]
        return {
            c.nodes.address: sum(h.stake for h in self.hosts.values()),
            c.verifiers.address: sum(v.stake for v in self.verifiers.values()),
            c.disputes.address: sum(self.credit.values())
            + sum(d.bond + d.penalties for d in open_disputes),
            c.marketplace.address: self.treasury,
            c.earnings.address: sum(h.earned for h in self.hosts.values()),
        }

    @invariant()
    def every_unit_is_accounted_for(self) -> None:
        """After every step that mined a block (see test_invariants.py for why)."""
        block = self.chain.block_number()
        if block == self.checked_block:
            return
        c = self.c
        contracts = self.contract_balances()
        balances = {a: self.balance(a) for a in [*self.wallet, *contracts]}
        assert sum(balances.values()) + self.outside == self.read(c.token, "totalSupply")
        assert self.read(c.token, "totalSupply") == self.supply
        for address, owed in contracts.items():
            assert balances[address] == owed, address
        for address, expected in self.wallet.items():
            assert balances[address] == expected, address
        for address, expected_credit in self.credit.items():
            assert self.read(c.disputes, "credit", address) == expected_credit, address
        for address, host in self.hosts.items():
            info = c.nodes.get_host(address)
            assert (info.stake, info.exposure) == (host.stake, host.exposure), address
            assert info.active == (host.stake >= self.host_min)
            assert info.exposure * BPS <= info.stake * self.exposure_bps, "exposure above the cap"
        for address, v in self.verifiers.items():
            info = c.verifiers.get_verifier(address)
            assert (info.stake, info.registered, info.assignments) == (
                v.stake,
                v.registered,
                v.assignments,
            ), address
            assert info.unbonding_ends_at == v.unbonding_ends_at
            assert info.active == self.verifier_active(address)
        for did, d in self.disputes.items():
            info = c.disputes.get_dispute(did)
            assert (info.status, info.fraud, info.penalties) == (d.status, d.fraud, d.penalties)
            assert info.verdict_deadline == d.deadline
            assert list(info.jurors) == [j or "0x" + "00" * 20 for j in d.seats]
            votes = list(d.votes.values())
            assert (info.votes_fraud, info.votes_honest) == (votes.count(True), votes.count(False))
        for sid, s in self.sessions.items():
            assert self.read(c.disputes, "dispute_of_session", sid) == s.dispute
            assert c.disputes.is_released(sid) == s.released
            assert c.disputes.is_fraudulent(sid) == s.fraudulent
        self.checked_block = block


def test_dispute_invariants_hold_over_random_histories(dispute_world: World) -> None:
    run_state_machine_as_test(
        lambda: DisputeMachine(dispute_world),
        settings=machine_settings(MAX_EXAMPLES, STEPS),
    )
