"""Stateful invariants of the marketplace, on both chains.

Hypothesis drives random sequences of session creation, checkpoints, completion,
close requests, finalization, withdrawals, blocked depositors, fee changes and
time travel over three users and three hosts. A Python model predicts every
outcome (including which calls must revert, and why) and after every step the
chain is checked against it:

- the marketplace holds exactly open deposits + treasury balance + credited refunds
  (contract counters and model agree);
- HostEarnings holds exactly the sum of the host balances;
- every settlement splits host + fee + refund == deposit exactly, as ``settlement_split``
  says for the session's input and output counts and prices;
- a session finalized (or completed) is settled, and one whose deadline has surely
  passed can be finalized by anyone; before its deadline finalize reverts;
- neither of a session's paid counts (input, output) ever decreases, and its stored
  fields match the model.

Block timestamps follow the wall clock on both chains, so the model only knows
the next block's time to within ``SLACK`` seconds; inside that band a
time-dependent call may go either way, and a success is then checked against
the timestamp of the block it landed in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from inferledger.chain.contracts import (
    STATUS_OPEN,
    STATUS_SETTLED,
    SessionInfo,
    SettlementEvent,
)
from inferledger.chain.devchain import DevWorld
from inferledger.chain.errors import ContractRevert
from inferledger.chain.tx import TxSender
from inferledger.chain.units import MTOK, Split, cost, settlement_split, usdc
from support import URI, machine_settings, sign

T = TypeVar("T")


# The next block's timestamp is in [latest, latest + SLACK] (wall clock drift).
SLACK = 15
USER_FUNDS = usdc(1_000_000)
# (input, output) per Mtok. Odd prices exercise the rounding of cost and fee; one host
# gives prompts away, the other charges more for them than for completions. The
# world's host keeps its own prices.
EXTRA_HOST_PRICES = [(0, 333_333_337), (123_456_789, 7_777_777)]
MAX_UINT = 2**256 - 1

# Sessions per history: bounds the per-step checks and keeps histories on lifecycles.
MAX_SESSIONS = 6
MAX_EXAMPLES = 12
STEPS = 40

BLOCKED = ("blocked", "transfer failed")


@dataclass
class Market:
    """The world plus extra users and hosts, and a snapshot of that state."""

    world: DevWorld
    users: list[TxSender]
    hosts: list[TxSender]
    prices: list[tuple[int, int]]
    snapshot: Any


@pytest.fixture
def market(world: DevWorld) -> Market:
    """Extra accounts, set up once per chain (the ``world`` fixture undoes them)."""
    return build_market(world)


def build_market(world: DevWorld) -> Market:
    """Two more users and two more hosts (odd prices) on top of the world's own."""
    c = world.contracts
    users = [world.user] + [world.funded_sender(f"invariant-user-{i}") for i in (1, 2)]
    for user in users:
        c.token.mint(user, user.address, USER_FUNDS)
        c.token.approve(user, c.marketplace.address, MAX_UINT)
    hosts = [world.host]
    prices: list[tuple[int, int]] = [c.nodes.prices_of(world.host.address, world.model_id)]
    # Every host stakes enough that its exposure cap (open deposits plus paid amounts in
    # their dispute window, at most exposure_bps of the stake) never binds in a history:
    # the cap has its own tests (test_registry_reverts.py).
    stake = HOST_STAKE
    extra = stake - c.deployment.params.min_stake
    c.token.mint(world.host, world.host.address, extra)
    c.token.approve(world.host, c.nodes.address, extra)
    c.nodes.add_stake(world.host, extra)
    for i, price in enumerate(EXTRA_HOST_PRICES, 1):
        host = world.funded_sender(f"invariant-host-{i}", stake)
        c.token.approve(host, c.nodes.address, stake)
        c.nodes.register(host, f"ws://host-{i}.invalid", {world.model_id: price}, stake)
        hosts.append(host)
        prices.append(price)
    return Market(world, users, hosts, prices, world.chain.snapshot())


@dataclass
class ModelSession:
    sid: int
    depositor: int  # index into users
    host: int  # index into hosts
    signer: LocalAccount
    deposit: int
    input_price: int
    output_price: int
    fee_bps: int
    proof_interval: int
    expires_at: int
    close_requested_at: int = 0
    input_paid: int = 0
    output_paid: int = 0
    proof_hash: bytes = b"\x00" * 32
    checkpoints: int = 0
    split: Split | None = None

    @property
    def is_open(self) -> bool:
        return self.split is None

    def deadline(self, window: int) -> int:
        start = self.expires_at
        if self.close_requested_at and self.close_requested_at < self.expires_at:
            start = self.close_requested_at
        return start + window

    @property
    def paid(self) -> tuple[int, int]:
        return self.input_paid, self.output_paid

    def cost(self, tokens: tuple[int, int]) -> int:
        return cost(*tokens, self.input_price, self.output_price)

    def max_output(self, input_tokens: int) -> int:
        """The most output tokens whose (rounded-down) cost, with ``input_tokens``, fits
        in the deposit (-1 if the input tokens alone do not fit)."""
        room = (self.deposit + 1) * MTOK - 1 - input_tokens * self.input_price
        return room // self.output_price if room >= 0 else -1

    def max_input(self, output_tokens: int) -> int | None:
        """The same for input tokens with ``output_tokens``; None for free prompts."""
        if self.input_price == 0:
            return None
        room = (self.deposit + 1) * MTOK - 1 - output_tokens * self.output_price
        return room // self.input_price if room >= 0 else -1


def signer_for(sid: int) -> LocalAccount:
    return Account.from_key(keccak(text=f"invariant-signer:{sid}"))


HOST_STAKE = usdc(10_000)
INTRUDER = Account.from_key(keccak(text="invariant-intruder"))

selector = st.integers(min_value=0, max_value=2**16)
deposits = st.one_of(
    st.integers(min_value=10_000, max_value=usdc(50)), st.sampled_from([10_000, usdc(2)])
)
proof_intervals = st.one_of(st.integers(min_value=10, max_value=5_000), st.just(10))
durations = st.one_of(
    st.integers(min_value=60, max_value=3 * 86400), st.sampled_from([60, 30 * 86400])
)
# Mostly valid sessions; otherwise one parameter broken, with the revert it must cause.
CREATE_FAULTS = [None] * 8 + [
    "offer_input",
    "offer_output",
    "deposit_low",
    "deposit_high",
    "interval_low",
    "interval_high",
    "duration_low",
    "duration_high",
    "budget",
]
token_kinds = st.sampled_from(
    ["valid", "valid", "valid", "max", "stale", "over", "badsig", "other"]
)


class MarketMachine(RuleBasedStateMachine):
    def __init__(self, market: Market) -> None:
        super().__init__()
        self.market = market
        self.world = market.world
        self.chain = market.world.chain
        self.c = market.world.contracts
        self.chain.revert(market.snapshot)
        market.snapshot = self.chain.snapshot()  # anvil reverts to a snapshot only once
        self.chain.mine()  # latest block time catches up with the clock again
        self.users = market.users
        self.hosts = market.hosts
        self.owner = self.world.owner
        self.treasury_address = self.c.deployment.treasury
        params = self.c.deployment.params
        self.min_deposit, self.max_deposit = params.min_deposit, params.max_deposit
        self.window = self.c.marketplace.close_window()
        self.fee_bps = self.c.marketplace.fee_bps()
        self.sessions: dict[int, ModelSession] = {}
        self.seen_tokens: dict[int, tuple[int, int]] = {}
        self.treasury = 0
        self.credit = {u.address: 0 for u in self.users}
        self.earned = {h.address: 0 for h in self.hosts}
        self.blocked: set[str] = set()
        actors = {a.address for a in [*self.users, *self.hosts, self.owner]}
        self.checked_block = -1
        self.wallet = {a: self.c.token.balance_of(a) for a in actors | {self.treasury_address}}

    # Helpers --------------------------------------------------------------------------

    def pick(self, index: int) -> ModelSession:
        """Mostly an open session; one time in five any session (settled ones too)."""
        ids = sorted(sid for sid, s in self.sessions.items() if s.is_open)
        if not ids or index % 5 == 0:
            ids = sorted(self.sessions)
        return self.sessions[ids[(index // 5) % len(ids)]]

    def timing(self, deadline: int) -> str:
        """Whether the next transaction is surely "before" (<=) or "after" the deadline."""
        now = self.chain.now()
        if now + SLACK <= deadline:
            return "before"
        if now > deadline:
            return "after"
        return "unknown"

    def block_time(self, receipt: Any) -> int:
        return int(self.chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"])

    def settlement_time(self, event: SettlementEvent) -> int:
        return self.block_time(self.chain.w3.eth.get_transaction_receipt(event.tx_hash))

    def attempt(self, call: Callable[[], T], reasons: list[str], may_succeed: bool) -> T | None:
        """Run ``call``; a revert must carry one of ``reasons``; success must be allowed."""
        try:
            result = call()
        except ContractRevert as exc:
            assert any(r in exc.reason for r in reasons), (
                f"unexpected revert {exc.reason!r}; expected one of {reasons}"
                + ("" if not may_succeed else " or success")
            )
            return None
        assert may_succeed, f"call succeeded but should have reverted with one of {reasons}"
        return result

    def token_error(self, s: ModelSession, tokens: tuple[int, int], good_sig: bool) -> str | None:
        """The contract's checks on new (input, output) counts, in its order."""
        if tokens[0] < s.input_paid or tokens[1] < s.output_paid:
            return "tokens must not decrease"
        if tokens == s.paid:
            return "tokens must increase"
        if s.cost(tokens) > s.deposit:
            return "tokens exceed budget"
        if not good_sig:
            return "receipt not signed by session signer"
        return None

    def choose_tokens(self, s: ModelSession, kind: str, step: int) -> tuple[int, int]:
        """New cumulative (input, output) counts of the given kind (see ``token_kinds``)."""
        pin, pout = s.paid
        if kind == "max":  # the most output the deposit buys at the current input
            return pin, max(pout, s.max_output(pin))
        if kind == "stale":  # one count lower than paid, the other maybe higher
            if pin == pout == 0:
                return 0, 0
            if pout and (step % 2 or not pin):
                return pin + step % 3, pout - 1 - step % pout
            return pin - 1 - step % pin, pout + step % 3
        if kind == "over":  # one count past the budget
            top_in = s.max_input(pout)
            if top_in is not None and step % 2:
                return max(pin, top_in + 1 + step % 1000), pout
            return pin, max(pout, s.max_output(pin) + 1 + step % 1000)
        # valid: mostly both counts grow within the budget (the model judges the rest)
        new_in = pin + step % 40
        top_out = s.max_output(new_in)
        if top_out <= pout:
            return new_in, pout
        return new_in, pout + 1 + step % (top_out - pout)

    def settle_model(self, s: ModelSession, event: SettlementEvent) -> None:
        split = settlement_split(s.deposit, *s.paid, s.input_price, s.output_price, s.fee_bps)
        assert event.session_id == s.sid
        assert (event.input_tokens, event.output_tokens) == s.paid
        assert (event.host_amount, event.fee, event.refund) == (split.host, split.fee, split.refund)
        assert event.host_amount + event.fee + event.refund == s.deposit
        s.split = split
        self.treasury += split.fee
        self.earned[self.hosts[s.host].address] += split.host
        depositor = self.users[s.depositor].address
        credited = split.refund > 0 and depositor in self.blocked
        assert event.refund_credited == credited
        if credited:
            self.credit[depositor] += split.refund
        else:
            self.wallet[depositor] += split.refund

    # Rules ------------------------------------------------------------------------------

    @initialize(
        first=st.lists(
            st.tuples(st.integers(0, 2), st.integers(0, 2), deposits, proof_intervals, durations),
            min_size=1,
            max_size=3,
        ),
        block_first_depositor=st.booleans(),
    )
    def open_first_sessions(
        self, first: list[tuple[int, int, int, int, int]], block_first_depositor: bool
    ) -> None:
        """Start every history with open sessions, maybe one whose depositor gets blocked."""
        for user, host, deposit, proof_interval, duration in first:
            self.create_session(user, host, deposit, proof_interval, duration, None, None)
        if block_first_depositor:
            self.set_blocked(first[0][0], True)

    @precondition(lambda self: len(self.sessions) < MAX_SESSIONS)
    @rule(
        user=st.integers(0, 2),
        host=st.integers(0, 2),
        deposit=deposits,
        proof_interval=proof_intervals,
        duration=durations,
        fault=st.sampled_from(CREATE_FAULTS),
        new_fee=st.one_of(st.none(), st.none(), st.none(), st.integers(0, 2001)),
    )
    def create_session(
        self,
        user: int,
        host: int,
        deposit: int,
        proof_interval: int,
        duration: int,
        fault: str | None,
        new_fee: int | None,
    ) -> None:
        if new_fee is not None:
            self.set_fee(new_fee)
        input_price, output_price = self.market.prices[host]
        offer_in, offer_out = input_price, output_price
        # Buys at least one interval (of output tokens).
        deposit = max(deposit, cost(0, proof_interval, input_price, output_price))
        sender = self.users[user]
        expected: str | None = None
        if fault == "offer_input" and input_price > 0:
            offer_in, expected = input_price - 1, "host input price above offered price"
        elif fault in ("offer_input", "offer_output"):
            offer_out, expected = output_price - 1, "host output price above offered price"
        elif fault == "deposit_low":
            deposit, expected = self.min_deposit - 1, "deposit below minimum"
        elif fault == "deposit_high":
            deposit, expected = self.max_deposit + 1, "deposit above maximum"
        elif fault == "interval_low":
            proof_interval, expected = 9, "proof interval too small"
        elif fault == "interval_high":
            proof_interval, expected = 1_000_001, "proof interval too large"
        elif fault == "duration_low":
            duration, expected = 59, "duration too short"
        elif fault == "duration_high":
            duration, expected = 30 * 86400 + 1, "duration too long"
        elif fault == "budget":
            # The smallest deposit, with an interval one token too long for it.
            deposit = self.min_deposit
            proof_interval = max(10, ((deposit + 1) * MTOK + output_price - 1) // output_price)
            assert cost(0, proof_interval, input_price, output_price) > deposit
            expected = "deposit buys less than one proof interval"
        elif sender.address in self.blocked:
            expected = "blocked"
        sid_next = len(self.sessions) + 1
        signer = signer_for(sid_next)
        now = self.chain.now()
        sid = self.attempt(
            lambda: self.c.marketplace.create_session(
                sender,
                host=self.hosts[host].address,
                model_id=self.world.model_id,
                deposit=deposit,
                max_input_price_per_mtok=offer_in,
                max_output_price_per_mtok=offer_out,
                max_duration=duration,
                proof_interval=proof_interval,
                session_signer=signer.address,
            ),
            [expected] if expected else [],
            expected is None,
        )
        if sid is None:
            return
        assert sid == sid_next
        info = self.c.marketplace.get_session(sid)
        assert now <= info.created_at <= now + SLACK
        assert info.expires_at == info.created_at + duration
        assert (info.depositor, info.host, info.signer) == (
            sender.address,
            self.hosts[host].address,
            signer.address,
        )
        assert (
            info.deposit,
            info.input_price_per_mtok,
            info.output_price_per_mtok,
            info.fee_bps,
            info.proof_interval,
        ) == (deposit, input_price, output_price, self.fee_bps, proof_interval)
        self.sessions[sid] = ModelSession(
            sid,
            user,
            host,
            signer,
            deposit,
            input_price,
            output_price,
            self.fee_bps,
            proof_interval,
            info.expires_at,
        )
        self.seen_tokens[sid] = (0, 0)
        self.wallet[sender.address] -= deposit

    @precondition(lambda self: self.sessions)
    @rule(index=selector, kind=token_kinds, step=selector)
    def checkpoint(self, index: int, kind: str, step: int) -> None:
        s = self.pick(index)
        tokens = self.choose_tokens(s, kind, step)
        proof = keccak(text=f"proof:{s.sid}:{tokens}")
        signer = INTRUDER if kind == "badsig" else s.signer
        sig = sign(self.world, signer, s.sid, *tokens, proof)
        sender = self.caller(s, kind)
        later = self.token_error(s, tokens, kind != "badsig")
        when = self.timing(s.deadline(self.window))
        reasons, may_succeed = self.host_call_outcome(s, kind, later, when)
        receipt = self.attempt(
            lambda: self.c.marketplace.submit_checkpoint(sender, s.sid, *tokens, proof, URI, sig),
            reasons,
            may_succeed,
        )
        if receipt is None:
            return
        assert self.block_time(receipt) <= s.deadline(self.window)
        self.record_checkpoint(s, tokens, proof)

    @staticmethod
    def record_checkpoint(s: ModelSession, tokens: tuple[int, int], proof: bytes) -> None:
        (s.input_paid, s.output_paid), s.proof_hash = tokens, proof
        s.checkpoints += 1

    def caller(self, s: Any, kind: str) -> TxSender:
        """The session's host, or another host for the "other" kind."""
        return self.hosts[(s.host + 1) % len(self.hosts)] if kind == "other" else self.hosts[s.host]

    @staticmethod
    def host_call_outcome(
        s: Any, kind: str, later: str | None, when: str
    ) -> tuple[list[str], bool]:
        """Revert reasons a host's checkpoint/complete may give, and whether it may succeed."""
        if not s.is_open:
            return ["session not open"], False
        if kind == "other":
            return ["caller is not the host"], False
        if when == "after":
            return ["session deadline passed"], False
        reasons = [later] if later else []
        if when == "unknown":
            reasons.append("session deadline passed")
        return reasons, later is None

    @precondition(lambda self: self.sessions)
    @rule(
        index=selector,
        kind=st.sampled_from(["same", "valid", "valid", "max", "stale", "over", "other"]),
        step=selector,
    )
    def complete(self, index: int, kind: str, step: int) -> None:
        s = self.pick(index)
        tokens = s.paid if kind == "same" else self.choose_tokens(s, kind, step)
        proof = keccak(text=f"final:{s.sid}:{tokens}")
        is_new = tokens != s.paid
        sig = sign(self.world, s.signer, s.sid, *tokens, proof) if is_new else b""
        sender = self.caller(s, kind)
        later = self.token_error(s, tokens, True) if is_new else None
        when = self.timing(s.deadline(self.window))
        reasons, may_succeed = self.host_call_outcome(s, kind, later, when)
        event = self.attempt(
            lambda: self.c.marketplace.complete_session(sender, s.sid, *tokens, proof, URI, sig),
            reasons,
            may_succeed,
        )
        if event is None:
            return
        assert self.settlement_time(event) <= s.deadline(self.window)
        if is_new:
            self.record_checkpoint(s, tokens, proof)
        self.settle_model(s, event)

    @precondition(lambda self: self.sessions)
    @rule(index=selector, caller=st.sampled_from(["depositor"] * 4 + ["other"]))
    def request_close(self, index: int, caller: str) -> None:
        s = self.pick(index)
        depositor = self.users[s.depositor]
        sender = depositor if caller == "depositor" else self.users[(s.depositor + 1) % 3]
        if not s.is_open:
            reasons = ["session not open"]
        elif caller != "depositor":
            reasons = ["caller is not the depositor"]
        elif s.close_requested_at:
            reasons = ["close already requested"]
        else:
            reasons = []
        receipt = self.attempt(
            lambda: self.c.marketplace.request_close(sender, s.sid), reasons, not reasons
        )
        if receipt is None:
            return
        s.close_requested_at = self.block_time(receipt)
        assert self.c.marketplace.get_session(s.sid).close_requested_at == s.close_requested_at
        assert self.c.marketplace.session_deadline(s.sid) == s.deadline(self.window)

    @precondition(lambda self: self.sessions)
    @rule(index=selector, caller=st.integers(0, 6))
    def finalize(self, index: int, caller: int) -> None:
        s = self.pick(index)
        sender = [*self.users, *self.hosts, self.owner][caller]
        deadline = s.deadline(self.window)
        assert self.c.marketplace.session_deadline(s.sid) == deadline
        when = self.timing(deadline)
        if not s.is_open:
            reasons, may_succeed = ["session not open"], False
        elif when == "before":
            reasons, may_succeed = ["close window still open"], False
        elif when == "unknown":
            reasons, may_succeed = ["close window still open"], True
        else:
            reasons, may_succeed = [], True
        event = self.attempt(
            lambda: self.c.marketplace.finalize(sender, s.sid), reasons, may_succeed
        )
        if event is None:
            return
        assert self.settlement_time(event) > deadline
        self.settle_model(s, event)
        assert self.c.marketplace.get_session(s.sid).status == STATUS_SETTLED

    @rule(
        kind=st.sampled_from(["earnings", "earnings", "refund", "refund", "treasury"]),
        index=st.integers(0, 11),
    )
    def withdraw(self, kind: str, index: int) -> None:
        """A host's earnings, a depositor's credited refund, or the treasury's fees."""
        if kind == "earnings":
            self.withdraw_earnings(self.prefer(self.hosts, self.earned, index))
        elif kind == "refund":
            self.withdraw_refund(self.prefer(self.users, self.credit, index))
        else:
            self.withdraw_treasury(self.owner if index % 4 else self.users[0])

    @staticmethod
    def prefer(senders: list[TxSender], owed: dict[str, int], index: int) -> TxSender:
        """Mostly someone who is owed something; one time in four anyone."""
        owed_to = [s for s in senders if owed[s.address]]
        pool = owed_to if owed_to and index % 4 else senders
        return pool[index % len(pool)]

    def withdraw_earnings(self, sender: TxSender) -> None:
        amount = self.earned[sender.address]
        reasons = [] if amount else ["nothing to withdraw"]
        receipt = self.attempt(
            lambda: self.c.earnings.withdraw(sender, self.c.token.address), reasons, bool(amount)
        )
        if receipt is not None:
            self.earned[sender.address] = 0
            self.wallet[sender.address] += amount

    def withdraw_refund(self, sender: TxSender) -> None:
        amount = self.credit[sender.address]
        if not amount:
            reasons = ["no refund to withdraw"]
        elif sender.address in self.blocked:
            reasons = list(BLOCKED)
        else:
            reasons = []
        receipt = self.attempt(
            lambda: self.c.marketplace.withdraw_refund(sender), reasons, not reasons
        )
        if receipt is not None:
            self.credit[sender.address] = 0
            self.wallet[sender.address] += amount

    def withdraw_treasury(self, sender: TxSender) -> None:
        if sender.address != self.treasury_address:
            reasons = ["caller is not the treasury"]
        elif not self.treasury:
            reasons = ["treasury balance is zero"]
        else:
            reasons = []
        receipt = self.attempt(
            lambda: self.c.marketplace.withdraw_treasury(sender), reasons, not reasons
        )
        if receipt is not None:
            self.wallet[self.treasury_address] += self.treasury
            self.treasury = 0

    @rule(index=st.integers(0, 11), blocked=st.booleans())
    def set_blocked(self, index: int, blocked: bool) -> None:
        """The owner blocks a depositor in the token (refunds to it then fail), or
        unblocks one, mostly one that is blocked."""
        pool = self.users
        if not blocked and index % 4:
            pool = [u for u in self.users if u.address in self.blocked] or self.users
        address = pool[index % len(pool)].address
        self.c.token.set_blocked(self.owner, address, blocked)
        if blocked:
            self.blocked.add(address)
        else:
            self.blocked.discard(address)

    def set_fee(self, fee_bps: int) -> None:
        """The owner changes the fee; only sessions created afterwards use it."""
        reasons = ["fee above maximum"] if fee_bps > 2000 else []
        receipt = self.attempt(
            lambda: self.c.marketplace.set_fee_bps(self.owner, fee_bps), reasons, not reasons
        )
        if receipt is not None:
            self.fee_bps = fee_bps

    @rule(
        seconds=st.one_of(
            st.integers(1, 600),
            st.integers(600, 2 * 3600),
            st.integers(2 * 3600, 4 * 86400),
        ),
        near_deadline_of=st.one_of(st.none(), selector),
        offset=st.sampled_from([-3 * SLACK, -1, 0, 1, 3 * SLACK]),
    )
    def time_travel(self, seconds: int, near_deadline_of: int | None, offset: int) -> None:
        """Move time forward by ``seconds``, or to right next to a session's deadline,
        where checkpoint/complete and finalize trade places."""
        if near_deadline_of is not None and self.sessions:
            target = self.pick(near_deadline_of).deadline(self.window) + offset
            seconds = target - self.chain.now()
        if seconds > 0:
            self.chain.time_travel(seconds)

    # Invariants -------------------------------------------------------------------------
    # Reads go straight to the web3 contracts with an explicit "from": the wrappers'
    # calls make the embedded chain look up its accounts on every read, which doubles
    # the cost of the checks below.

    def read(self, wrapper: Any, name: str, *args: Any) -> Any:
        return wrapper.contract.functions[name](*args).call({"from": self.owner.address})

    def balance(self, address: str) -> int:
        return self.read(self.c.token, "balanceOf", address)

    @invariant()
    def chain_matches_model(self) -> None:
        """Every check below, after every step that mined a block.

        A step that mined nothing (all its calls reverted in gas estimation) left the
        chain as it was, and the model is only updated after a mined success, so the
        previous check still holds and is not repeated.
        """
        block = self.chain.block_number()
        if block == self.checked_block:
            return
        self.marketplace_holds_exactly_what_it_owes()
        self.host_earnings_hold_exactly_the_host_balances()
        self.sessions_match_the_model()
        self.checked_block = block

    def marketplace_holds_exactly_what_it_owes(self) -> None:
        mp = self.c.marketplace
        open_deposits = self.read(mp, "open_deposits")
        model_open = sum(s.deposit for s in self.sessions.values() if s.is_open)
        assert open_deposits == model_open
        treasury = self.read(mp, "treasury_balance")
        assert treasury == self.treasury
        credits = {u.address: self.read(mp, "refund_credit", u.address) for u in self.users}
        assert credits == self.credit
        balance = self.balance(mp.address)
        assert balance == open_deposits + treasury + sum(credits.values())
        assert balance == model_open + self.treasury + sum(self.credit.values())

    def host_earnings_hold_exactly_the_host_balances(self) -> None:
        token, earnings = self.c.token.address, self.c.earnings
        balances = {
            h.address: self.read(earnings, "balance_of", h.address, token) for h in self.hosts
        }
        assert balances == self.earned
        assert self.balance(earnings.address) == sum(balances.values())

    def sessions_match_the_model(self) -> None:
        for sid, s in self.sessions.items():
            info = SessionInfo(sid, *self.read(self.c.marketplace, "get_session", sid))
            paid = (info.input_tokens_paid, info.output_tokens_paid)
            seen = self.seen_tokens[sid]
            assert paid[0] >= seen[0], "input_tokens_paid decreased"
            assert paid[1] >= seen[1], "output_tokens_paid decreased"
            self.seen_tokens[sid] = paid
            assert paid == s.paid
            assert bytes(info.proof_hash) == s.proof_hash
            assert info.checkpoints == s.checkpoints
            assert info.close_requested_at == s.close_requested_at
            assert info.status == (STATUS_OPEN if s.is_open else STATUS_SETTLED)
            if not s.is_open:
                split = s.split
                assert split is not None
                assert split.host + split.fee + split.refund == s.deposit
                assert split == settlement_split(
                    s.deposit, *s.paid, s.input_price, s.output_price, s.fee_bps
                )

    def teardown(self) -> None:
        """Checks too costly for every step: every wallet, and the hosts' open counts.

        Skipped when a step failed after mining (chain and model then disagree
        already, and that step's error is the one to report).
        """
        if self.chain.block_number() != self.checked_block:
            return
        for address, expected in self.wallet.items():
            assert self.balance(address) == expected, address
        for i, host in enumerate(self.hosts):
            count = sum(1 for s in self.sessions.values() if s.is_open and s.host == i)
            assert self.c.nodes.get_host(host.address).open_sessions == count


def test_marketplace_invariants_hold_over_random_histories(market: Market) -> None:
    run_state_machine_as_test(
        lambda: MarketMachine(market),
        settings=machine_settings(MAX_EXAMPLES, STEPS),
    )
