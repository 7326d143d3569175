"""The billing rules of one session (inferledger.node.metering), without a WebSocket.

First tables of cases, one rule each, asserting the exact outcome and refusal code; then a
hypothesis state machine in which an honest-or-hostile client drives a meter through
prompts, tokens, receipt requests, signatures (honest, stale or bogus), disconnects and
resumes, and closing, while a small model predicts every outcome and the billing
invariants are checked after every step.

Costs are recomputed here with the contract's formula, ``(in * p_in + out * p_out) //
1_000_000``, rather than through ``Terms.cost``, so a rounding change in either shows up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from inferledger.chain.units import settlement_split
from inferledger.node.metering import (
    Counts,
    Meter,
    MeterRefusal,
    Phase,
    ReceiptRequest,
    SentToken,
    Terms,
    settle_lead,
)

MTOK = 1_000_000
FEE_BPS = 1000
TRANSCRIPT = b"\x7e" * 32
H1, H2, H3 = (bytes([n]) * 32 for n in (1, 2, 3))
# 1 base unit per output token, 0.1 per input token, a million units: never the limit.
ROOMY = Terms(deposit=1_000_000, input_price_per_mtok=100_000, output_price_per_mtok=MTOK)
BIG_CAP = 10**9


def contract_cost(terms: Terms, input_tokens: int, output_tokens: int) -> int:
    """JobMarketplace's charge, written out independently of ``Terms.cost``."""
    total = input_tokens * terms.input_price_per_mtok
    total += output_tokens * terms.output_price_per_mtok
    return total // MTOK


Snapshot = tuple[Counts, Counts, Phase, tuple[ReceiptRequest, ...], tuple[SentToken, ...], int]


def snapshot(meter: Meter) -> Snapshot:
    return (
        meter.served,
        meter.receipted,
        meter.phase,
        tuple(meter.pending),
        tuple(meter.tail),
        meter.abandoned,
    )


def stream(meter: Meter, most: int) -> int:
    """Send tokens while ``may_send`` allows, at most ``most``, like the node; how many."""
    sent = 0
    while sent < most and meter.may_send():
        index = meter.token_sent(1000 + meter.served.output, f"t{meter.served.output}")
        sent += 1
        assert index == meter.served.output
    return sent


def ask(meter: Meter, proof_hash: bytes = H1) -> ReceiptRequest:
    """The node asks a receipt for everything served; the request the meter holds for it
    (the first one asked for these counts)."""
    meter.request(ReceiptRequest(meter.served, proof_hash, TRANSCRIPT))
    assert meter.pending[-1].counts == meter.served
    return meter.pending[-1]


def pay(meter: Meter, proof_hash: bytes = H1) -> ReceiptRequest:
    """Ask a receipt for everything served and have the client sign it."""
    request = ask(meter, proof_hash)
    meter.accept(meter.match(request.counts, request.proof_hash))
    return request


def reply(meter: Meter, prompt: int, tokens: int) -> None:
    """One whole reply: prompt, ``tokens`` tokens, end."""
    meter.start_reply(prompt)
    assert stream(meter, tokens) == tokens
    meter.end_reply()


# Prompts -------------------------------------------------------------------------------


def _fresh(m: Meter) -> None:
    pass


def _streaming(m: Meter) -> None:
    m.start_reply(3)
    stream(m, 2)


def _streaming_no_token_yet(m: Meter) -> None:
    m.start_reply(3)


def _owes_output(m: Meter) -> None:
    reply(m, 3, 2)


def _owes_input_only(m: Meter) -> None:
    reply(m, 3, 0)  # no reply token, but the prompt was prefilled: it is owed


def _asked_not_signed(m: Meter) -> None:
    reply(m, 3, 2)
    ask(m)


def _partly_receipted(m: Meter) -> None:
    m.start_reply(3)
    stream(m, 2)
    first = ask(m, H1)
    stream(m, 2)
    ask(m, H2)
    m.end_reply()
    m.accept(m.match(first.counts, H1))


def _paid_up(m: Meter) -> None:
    reply(m, 3, 2)
    pay(m)


def _paid_zero_token_prompt(m: Meter) -> None:
    reply(m, 3, 0)
    pay(m)


def _closing(m: Meter) -> None:
    m.begin_close()


def _closing_owing(m: Meter) -> None:
    reply(m, 3, 2)
    m.begin_close()


def _closing_mid_reply(m: Meter) -> None:
    m.start_reply(3)
    stream(m, 2)
    m.begin_close()
    m.end_reply()  # a closing session stays closing


def _closing_paid_up(m: Meter) -> None:
    reply(m, 3, 2)
    m.begin_close()
    pay(m)  # the final receipt


def _closed(m: Meter) -> None:
    m.close()


def _closed_owing(m: Meter) -> None:
    reply(m, 3, 2)
    m.close()


PROMPT_CASES: list[tuple[str, Callable[[Meter], None], str | None]] = [
    ("fresh", _fresh, None),
    ("streaming", _streaming, "REQUEST_IN_PROGRESS"),
    ("streaming, no token yet", _streaming_no_token_yet, "REQUEST_IN_PROGRESS"),
    ("owes output", _owes_output, "RECEIPT_OWED"),
    ("owes input only", _owes_input_only, "RECEIPT_OWED"),
    ("asked, not signed", _asked_not_signed, "RECEIPT_OWED"),
    ("partly receipted", _partly_receipted, "RECEIPT_OWED"),
    ("paid up", _paid_up, None),
    ("paid a zero-token reply", _paid_zero_token_prompt, None),
    ("closing", _closing, "SESSION_CLOSING"),
    ("closing, owing", _closing_owing, "SESSION_CLOSING"),
    ("closing mid reply", _closing_mid_reply, "SESSION_CLOSING"),
    ("closing, paid up", _closing_paid_up, "SESSION_CLOSING"),
    ("closed", _closed, "SESSION_CLOSING"),
    ("closed, owing", _closed_owing, "SESSION_CLOSING"),
]


@pytest.mark.parametrize(
    ("setup", "code"), [(s, c) for _, s, c in PROMPT_CASES], ids=[n for n, _, _ in PROMPT_CASES]
)
def test_prompt_rules(setup: Callable[[Meter], None], code: str | None) -> None:
    meter = Meter(ROOMY, 10)
    setup(meter)
    before = snapshot(meter)
    refusal = meter.prompt_refusal()
    assert (refusal.code if refusal else None) == code
    assert snapshot(meter) == before
    if code is None:
        meter.start_reply(5)
        assert meter.phase is Phase.STREAMING
        assert meter.served == Counts(before[0].input + 5, before[0].output)
        assert meter.receipted == before[1]
        assert meter.may_send()
        return
    with pytest.raises(MeterRefusal) as refused:
        meter.start_reply(5)
    assert refused.value.code == code
    assert snapshot(meter) == before  # a refused prompt changes nothing


def test_negative_prompt_is_an_error() -> None:
    meter = Meter(ROOMY, 10)
    with pytest.raises(ValueError):
        meter.start_reply(-1)
    assert meter.served == Counts() and meter.phase is Phase.IDLE


# (deposit, p_in, p_out, prompt and reply paid before, prompt, fits with one reply token)
BUDGET_CASES: list[tuple[int, int, int, tuple[int, int] | None, int, bool]] = [
    (10, MTOK, MTOK, None, 9, True),  # 9 + 1 == 10: exactly the deposit
    (10, MTOK, MTOK, None, 10, False),  # 11 > 10
    (1, 333_333, 500_000, None, 4, True),  # 1_833_332 // 1e6 == 1
    (1, 333_333, 500_000, None, 5, False),  # 2_166_665 // 1e6 == 2
    (0, 0, MTOK, None, 0, False),  # one reply token costs 1
    (0, 0, 999_999, None, 200, True),  # free input, a reply token rounds down to 0
    (0, 1, 999_999, None, 0, True),  # 999_999 // 1e6 == 0
    (0, 1, 999_999, None, 1, False),  # 1_000_000 // 1e6 == 1
    (5, 0, MTOK, (0, 4), 0, True),  # 4 paid, the fifth fits
    (5, 0, MTOK, (0, 5), 0, False),  # 5 paid, nothing left
    (10, MTOK, MTOK, (3, 3), 3, True),  # 6 paid + 3 + 1 == 10
    (10, MTOK, MTOK, (3, 3), 4, False),  # 6 paid + 4 + 1 == 11
]


@pytest.mark.parametrize(("deposit", "p_in", "p_out", "before", "prompt", "fits"), BUDGET_CASES)
def test_prompt_budget(
    deposit: int, p_in: int, p_out: int, before: tuple[int, int] | None, prompt: int, fits: bool
) -> None:
    terms = Terms(deposit, p_in, p_out)
    meter = Meter(terms, BIG_CAP)
    if before is not None:
        reply(meter, *before)
        pay(meter)
    served = meter.served
    # The table itself agrees with the contract's formula.
    assert fits == (contract_cost(terms, served.input + prompt, served.output + 1) <= deposit)
    assert meter.prompt_refusal() is None  # only start_reply knows the prompt's size
    state = snapshot(meter)
    if fits:
        meter.start_reply(prompt)
        assert meter.served == Counts(served.input + prompt, served.output)
        assert meter.phase is Phase.STREAMING
        assert meter.output_left() >= 1 and meter.may_send()
        return
    with pytest.raises(MeterRefusal) as refused:
        meter.start_reply(prompt)
    assert refused.value.code == "BUDGET_EXHAUSTED"
    assert snapshot(meter) == state  # served unchanged, still idle


# Output budget -------------------------------------------------------------------------

# (deposit, p_in, p_out, prompt, reply tokens that exactly fit)
OUTPUT_EDGES: list[tuple[int, int, int, int, int]] = [
    (5, 0, MTOK, 0, 5),
    (0, 0, 300_001, 0, 3),  # a zero deposit still pays 3 tokens: 900_003 // 1e6 == 0
    (4, 250_000, 750_000, 7, 4),  # 4_750_000 -> 4; one more 5_500_000 -> 5
    (2, 1, 999_999, 1, 3),  # 2_999_998 -> 2; one more 3_999_997 -> 3
    (3, MTOK, MTOK, 2, 1),  # only the one reply token start_reply checked
    (7, 123_457, 654_321, 13, 9),  # 7_493_830 -> 7; one more 8_148_151 -> 8
    (1, 333_333, 500_000, 4, 1),
]


@pytest.mark.parametrize(("deposit", "p_in", "p_out", "prompt", "fit"), OUTPUT_EDGES)
def test_output_left_at_budget_edge(
    deposit: int, p_in: int, p_out: int, prompt: int, fit: int
) -> None:
    terms = Terms(deposit, p_in, p_out)
    assert terms.cost(Counts(prompt, fit)) == contract_cost(terms, prompt, fit) <= deposit
    assert terms.cost(Counts(prompt, fit + 1)) == contract_cost(terms, prompt, fit + 1) > deposit
    assert terms.affordable(Counts(prompt, fit))
    assert not terms.affordable(Counts(prompt, fit + 1))
    meter = Meter(terms, BIG_CAP)
    meter.start_reply(prompt)
    assert meter.output_left() == fit
    assert stream(meter, 1) == 1
    assert meter.output_left() == fit - 1  # one per token sent
    assert stream(meter, fit + 10) == fit - 1  # exactly `fit` in all, never one more
    assert meter.served == Counts(prompt, fit)
    assert meter.output_left() == 0
    assert not meter.may_send()
    assert not meter.waiting_for_receipt()  # out of budget, not waiting: the reply ends
    with pytest.raises(RuntimeError):
        meter.token_sent(1, "x")
    assert meter.served == Counts(prompt, fit)


def test_output_left_counts_earlier_replies() -> None:
    terms = Terms(deposit=10, input_price_per_mtok=500_000, output_price_per_mtok=MTOK)
    meter = Meter(terms, BIG_CAP)
    reply(meter, 4, 3)  # 2 + 3 = 5 units
    pay(meter)
    meter.start_reply(2)  # 1 more unit: 6, so 4 reply tokens are left
    assert meter.output_left() == 4
    assert stream(meter, 100) == 4
    assert contract_cost(terms, 6, 7) == 10


# The receipt window --------------------------------------------------------------------


@pytest.mark.parametrize("cap", [1, 2, 3, 7, 40])
def test_window_closes_at_cap_and_reopens_on_receipt(cap: int) -> None:
    meter = Meter(ROOMY, cap)
    meter.start_reply(500)  # input never counts against the window
    assert stream(meter, 1000) == cap
    assert meter.served.output - meter.receipted.output == cap
    assert not meter.may_send()
    assert meter.waiting_for_receipt()
    with pytest.raises(RuntimeError):
        meter.token_sent(1, "x")
    request = ask(meter)
    assert not meter.may_send()  # asking is not being paid
    assert meter.match(request.counts, request.proof_hash) is request
    assert not meter.may_send()  # matching changes nothing either
    meter.accept(request)
    assert meter.receipted == Counts(500, cap)
    assert meter.may_send() and not meter.waiting_for_receipt()
    assert stream(meter, 1000) == cap
    assert meter.served.output == 2 * cap


def test_partial_receipt_reopens_the_window_by_what_it_covers() -> None:
    meter = Meter(ROOMY, 5)
    meter.start_reply(1)
    stream(meter, 3)
    first = ask(meter, H1)
    assert stream(meter, 100) == 2
    second = ask(meter, H2)
    meter.accept(meter.match(first.counts, H1))
    assert meter.pending == [second]
    assert stream(meter, 100) == 3  # 2 still unreceipted, 3 more fit
    assert not meter.may_send()
    assert meter.served == Counts(1, 8)


@pytest.mark.parametrize(
    ("served_output", "every", "due"),
    [(0, 1, False), (3, 4, False), (4, 4, True), (5, 4, True)],
)
def test_receipt_due_counts_from_the_last_request(
    served_output: int, every: int, due: bool
) -> None:
    meter = Meter(ROOMY, BIG_CAP)
    meter.start_reply(1)
    stream(meter, 2)
    ask(meter)  # requested: 2 output tokens
    stream(meter, served_output)
    assert meter.receipt_due(every) is due
    pay(meter, H2)
    assert not meter.receipt_due(every)


# Matching receipts ---------------------------------------------------------------------


@dataclass
class Asked:
    """A meter with a paid first request, a pending second one, and one more unasked token."""

    meter: Meter
    first: ReceiptRequest
    second: ReceiptRequest


def asked() -> Asked:
    meter = Meter(ROOMY, 100)
    meter.start_reply(4)
    stream(meter, 3)
    first = ask(meter, H1)  # (4, 3)
    stream(meter, 2)
    second = ask(meter, H2)  # (4, 5)
    meter.accept(meter.match(first.counts, H1))
    stream(meter, 1)  # (4, 6) served, not asked
    return Asked(meter, first, second)


MATCH_CASES: list[tuple[str, Counts, bytes, str | None]] = [
    ("the pending request", Counts(4, 5), H2, None),
    ("wrong proof hash", Counts(4, 5), H1, "RECEIPT_MISMATCH"),
    ("unknown proof hash", Counts(4, 5), H3, "RECEIPT_MISMATCH"),
    ("served, never asked", Counts(4, 6), H2, "RECEIPT_MISMATCH"),
    ("between two requests", Counts(4, 4), H2, "RECEIPT_MISMATCH"),
    ("more output than served", Counts(4, 7), H2, "RECEIPT_MISMATCH"),
    ("more input than served", Counts(5, 5), H2, "RECEIPT_MISMATCH"),
    ("less input, more output", Counts(3, 5), H2, "RECEIPT_MISMATCH"),
    ("already receipted", Counts(4, 3), H1, "RECEIPT_UNEXPECTED"),
    ("covered by the receipt", Counts(4, 2), H1, "RECEIPT_UNEXPECTED"),
    ("nothing", Counts(0, 0), H1, "RECEIPT_UNEXPECTED"),
]


@pytest.mark.parametrize(
    ("counts", "proof_hash", "code"),
    [(c, h, code) for _, c, h, code in MATCH_CASES],
    ids=[n for n, _, _, _ in MATCH_CASES],
)
def test_match(counts: Counts, proof_hash: bytes, code: str | None) -> None:
    case = asked()
    before = snapshot(case.meter)
    if code is None:
        assert case.meter.match(counts, proof_hash) is case.second
    else:
        with pytest.raises(MeterRefusal) as refused:
            case.meter.match(counts, proof_hash)
        assert refused.value.code == code
    assert snapshot(case.meter) == before  # match only looks


def test_a_count_is_asked_once_with_its_first_bundle() -> None:
    """Asking again for the same counts keeps what the client was first shown."""
    meter = Meter(ROOMY, 100)
    reply(meter, 1, 2)
    first = ReceiptRequest(meter.served, H1, TRANSCRIPT)
    meter.request(first)
    meter.request(ReceiptRequest(meter.served, H2, TRANSCRIPT))  # a newer bundle: ignored
    assert meter.pending == [first]
    with pytest.raises(MeterRefusal) as refused:
        meter.match(first.counts, H2)
    assert refused.value.code == "RECEIPT_MISMATCH"
    assert meter.match(first.counts, H1) is first
    stream_more = Meter(ROOMY, 100)
    stream_more.start_reply(1)
    stream(stream_more, 1)
    ask(stream_more, H1)
    stream(stream_more, 1)
    newer = ask(stream_more, H2)  # new counts: a second request, with its own bundle
    assert [r.proof_hash for r in stream_more.pending] == [H1, H2] and newer.proof_hash == H2


@pytest.mark.parametrize("counts", [Counts(4, 5), Counts(4, 3), Counts(4, 6), Counts(0, 0)])
def test_match_after_close_refuses_everything(counts: Counts) -> None:
    case = asked()
    case.meter.close()
    assert case.meter.phase is Phase.CLOSED
    assert case.meter.pending == []
    with pytest.raises(MeterRefusal) as refused:
        case.meter.match(counts, H2)
    assert refused.value.code == "SESSION_CLOSED"


def test_final_receipt_is_accepted_while_closing() -> None:
    case = asked()
    meter = case.meter
    meter.begin_close()
    assert not meter.may_send()
    final = ask(meter, H3)  # the tail is still asked for
    meter.accept(meter.match(final.counts, H3))
    assert meter.settled_up and meter.receipted == Counts(4, 6)
    assert meter.pending == [] and meter.tail == []
    meter.close()
    assert meter.phase is Phase.CLOSED and meter.receipted == Counts(4, 6)


def test_receipt_matched_before_close_is_kept_when_accepted_after() -> None:
    """The node matches, stores the receipt (awaiting), and close() may land meanwhile."""
    case = asked()
    meter = case.meter
    meter.begin_close()
    request = meter.match(case.second.counts, H2)
    meter.close()
    meter.accept(request)
    assert meter.receipted == case.second.counts
    assert [t.index for t in meter.tail] == [6]


# Accepting receipts --------------------------------------------------------------------


def three_requests() -> tuple[Meter, list[ReceiptRequest]]:
    meter = Meter(ROOMY, 100)
    meter.start_reply(2)
    requests = []
    for proof_hash in (H1, H2, H3):
        stream(meter, 2)
        requests.append(ask(meter, proof_hash))  # (2, 2), (2, 4), (2, 6)
    stream(meter, 1)  # index 7: sent, never asked
    return meter, requests


@pytest.mark.parametrize(
    ("accepted", "pending_left", "tail_left"),
    [
        (0, [1, 2], [3, 4, 5, 6, 7]),
        (1, [2], [5, 6, 7]),
        (2, [], [7]),
    ],
)
def test_accept_drops_what_it_covers(
    accepted: int, pending_left: list[int], tail_left: list[int]
) -> None:
    meter, requests = three_requests()
    assert [t.index for t in meter.tail] == [1, 2, 3, 4, 5, 6, 7]
    assert [t.token_id for t in meter.tail] == [1000 + i for i in range(7)]
    request = requests[accepted]
    meter.accept(meter.match(request.counts, request.proof_hash))
    assert meter.receipted == request.counts
    assert meter.pending == [requests[i] for i in pending_left]
    assert [t.index for t in meter.tail] == tail_left
    assert meter.served == Counts(2, 7)


def test_accept_of_a_dropped_request_is_an_error() -> None:
    meter, requests = three_requests()
    meter.accept(requests[1])
    before = snapshot(meter)
    with pytest.raises(ValueError):
        meter.accept(requests[0])  # dropped: covered by the receipt for requests[1]
    with pytest.raises(ValueError):
        meter.accept(ReceiptRequest(Counts(2, 7), H1, TRANSCRIPT))  # never asked
    assert snapshot(meter) == before


# Receipt requests ----------------------------------------------------------------------


def test_request_must_cover_everything_served() -> None:
    meter = Meter(ROOMY, 100)
    reply(meter, 2, 3)
    for counts in (Counts(2, 2), Counts(1, 3), Counts(2, 4)):
        with pytest.raises(ValueError):
            meter.request(ReceiptRequest(counts, H1, TRANSCRIPT))
    assert meter.pending == []
    pay(meter)
    with pytest.raises(ValueError):  # already receipted: nothing to ask
        meter.request(ReceiptRequest(meter.served, H2, TRANSCRIPT))
    assert meter.pending == []


def test_no_request_after_close() -> None:
    meter = Meter(ROOMY, 100)
    reply(meter, 2, 3)
    meter.close()
    with pytest.raises(RuntimeError):
        meter.request(ReceiptRequest(meter.served, H1, TRANSCRIPT))
    assert meter.pending == []


# Sending -------------------------------------------------------------------------------


def _cap_reached(m: Meter) -> None:
    m.start_reply(1)
    stream(m, 100)


def _budget_spent(m: Meter) -> None:
    m.terms = Terms(deposit=2, input_price_per_mtok=0, output_price_per_mtok=MTOK)
    m.max_unreceipted = BIG_CAP
    m.start_reply(1)
    assert stream(m, 100) == 2


def _reply_ended(m: Meter) -> None:
    reply(m, 1, 1)


def _reply_ended_paid(m: Meter) -> None:
    reply(m, 1, 1)
    pay(m)


def _closing_streamed(m: Meter) -> None:
    m.start_reply(1)
    stream(m, 1)
    m.begin_close()


def _closed_streamed(m: Meter) -> None:
    m.start_reply(1)
    stream(m, 1)
    m.close()


NO_SEND_CASES: list[tuple[str, Callable[[Meter], None], bool]] = [
    ("idle", _fresh, False),
    ("window full", _cap_reached, True),
    ("budget spent", _budget_spent, False),
    ("reply ended", _reply_ended, False),
    ("reply ended, paid", _reply_ended_paid, False),
    ("closing", _closing_streamed, False),
    ("closed", _closed_streamed, False),
]


@pytest.mark.parametrize(
    ("setup", "waiting"),
    [(s, w) for _, s, w in NO_SEND_CASES],
    ids=[n for n, _, _ in NO_SEND_CASES],
)
def test_token_sent_when_not_allowed_raises(setup: Callable[[Meter], None], waiting: bool) -> None:
    meter = Meter(ROOMY, 3)
    setup(meter)
    assert not meter.may_send()
    assert meter.waiting_for_receipt() is waiting
    before = snapshot(meter)
    with pytest.raises(RuntimeError):
        meter.token_sent(7, "x")
    assert snapshot(meter) == before


# Phases --------------------------------------------------------------------------------

ALLOWED = {
    (Phase.IDLE, Phase.STREAMING),
    (Phase.IDLE, Phase.CLOSING),
    (Phase.STREAMING, Phase.IDLE),
    (Phase.STREAMING, Phase.CLOSING),
    (Phase.CLOSING, Phase.CLOSED),
}


@pytest.mark.parametrize("to", list(Phase))
@pytest.mark.parametrize("start", list(Phase))
def test_phase_transitions(start: Phase, to: Phase) -> None:
    meter = Meter(ROOMY, 3, phase=start)
    if (start, to) in ALLOWED:
        meter._move(to)
        assert meter.phase is to
        return
    with pytest.raises(RuntimeError):
        meter._move(to)
    assert meter.phase is start


def test_public_phase_moves() -> None:
    meter = Meter(ROOMY, 3)
    meter.end_reply()  # nothing streaming: nothing to end
    assert meter.phase is Phase.IDLE
    meter.start_reply(1)
    assert meter.phase is Phase.STREAMING
    meter.end_reply()
    assert meter.phase is Phase.IDLE
    meter.begin_close()
    assert meter.phase is Phase.CLOSING
    meter.begin_close()
    meter.end_reply()
    assert meter.phase is Phase.CLOSING
    meter.close()
    assert meter.phase is Phase.CLOSED
    meter.close()
    meter.begin_close()
    meter.end_reply()
    assert meter.phase is Phase.CLOSED


def test_close_from_streaming_goes_through_closing() -> None:
    meter = Meter(ROOMY, 3)
    meter.start_reply(1)
    stream(meter, 1)
    ask(meter)
    meter.close()
    assert meter.phase is Phase.CLOSED and meter.pending == []
    assert meter.served == Counts(1, 1) and meter.receipted == Counts()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_unreceipted": 0}, "max_unreceipted"),
        ({"max_unreceipted": 1, "served": Counts(1, 1), "receipted": Counts(1, 2)}, "behind"),
        ({"max_unreceipted": 1, "served": Counts(1, 2), "receipted": Counts(2, 2)}, "behind"),
    ],
)
def test_meter_rejects_impossible_state(kwargs: dict[str, object], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Meter(ROOMY, **kwargs)  # type: ignore[arg-type]


def test_rebuilt_meter_must_receipt_before_the_next_prompt() -> None:
    """A meter rebuilt from the state (node restart) starts idle but still owes."""
    tail = [SentToken(3, 33, "c"), SentToken(4, 44, "d")]
    meter = Meter(ROOMY, 3, served=Counts(5, 4), receipted=Counts(5, 2), tail=tail)
    refusal = meter.prompt_refusal()
    assert refusal is not None and refusal.code == "RECEIPT_OWED"
    assert not meter.may_send()
    request = pay(meter)
    assert request.counts == Counts(5, 4) and meter.tail == [] and meter.prompt_refusal() is None


# settle_lead ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("configured", "duration", "lead"),
    [
        (600, 120, 12),
        (600, 86400, 600),
        (600, 6000, 600),
        (600, 5999, 599),
        (600, 9, 0),
        (0, 86400, 0),
    ],
)
def test_settle_lead(configured: int, duration: int, lead: int) -> None:
    assert settle_lead(configured, duration) == lead


# Regression: a stale receipt accepted after close() never lowers what is paid ----------


def test_accept_after_close_never_moves_receipted_back() -> None:
    meter, requests = three_requests()
    stale = meter.match(requests[0].counts, H1)
    meter.accept(meter.match(requests[2].counts, H3))
    meter.close()
    meter.accept(stale)
    assert meter.receipted == requests[2].counts


# The state machine ---------------------------------------------------------------------

terms_strategy = st.builds(
    Terms,
    deposit=st.one_of(st.integers(0, 60), st.integers(0, 400), st.sampled_from([0, 1, 7])),
    input_price_per_mtok=st.one_of(
        st.integers(0, 200_000), st.integers(0, 2_000_000), st.sampled_from([0, 1, 333_333])
    ),
    output_price_per_mtok=st.one_of(
        st.integers(1, 3_000_000), st.sampled_from([1, 299_999, 999_999, MTOK])
    ),
)


def most_output(terms: Terms, input_tokens: int) -> int:
    """The most output tokens whose contract cost, with ``input_tokens``, fits the deposit
    (-1 if not even zero do): a binary search over the contract formula."""
    if contract_cost(terms, input_tokens, 0) > terms.deposit:
        return -1
    low, high = 0, (terms.deposit + 1) * MTOK + 1  # cost(high) > deposit: p_out >= 1
    while high - low > 1:
        mid = (low + high) // 2
        if contract_cost(terms, input_tokens, mid) <= terms.deposit:
            low = mid
        else:
            high = mid
    return low


class MeterMachine(RuleBasedStateMachine):
    """A node's meter and an honest-or-hostile client, with a model of what must happen.

    The client has received ``received`` of the ``served.output`` tokens; the rest are in
    flight, and a disconnect loses them until the resumed session replays the tail.
    """

    def __init__(self) -> None:
        super().__init__()
        self.meter: Meter | None = None

    @initialize(terms=terms_strategy, cap=st.integers(1, 40), close_after=st.integers(0, 45))
    def setup(self, terms: Terms, cap: int, close_after: int) -> None:
        self.terms = terms
        self.cap = cap
        # Closing ends a history's interesting part: allowed only after some steps.
        self.steps = 0
        self.close_after = close_after
        self.meter = Meter(terms, cap)
        # The model.
        self.served = Counts()
        self.receipted = Counts()
        self.phase = Phase.IDLE
        self.pending: list[tuple[Counts, bytes]] = []
        self.token_ids: list[int] = []  # by index - 1
        self.last_prompt = 0
        self.bundle = b"\x00" * 32
        self.bundles = 0
        # The client.
        self.connected = True
        self.received = 0
        self.received_at_signing = 0  # what the client had when it signed `receipted`
        self.previous_receipted = Counts()

    @property
    def m(self) -> Meter:
        assert self.meter is not None
        return self.meter

    def eligible(self) -> list[tuple[Counts, bytes]]:
        """Pending requests the honest client may sign: it has all their tokens."""
        return [(c, h) for c, h in self.pending if c.output <= self.received]

    def node_requests(self, new_bundle: bool) -> None:
        """The node asks a receipt for everything served, from its newest bundle. (The
        connection skips the call when closed or when ``requested == served``; the meter
        must refuse or ignore it there anyway, which is checked.)"""
        if new_bundle or self.bundles == 0:
            self.bundles += 1
            self.bundle = self.bundles.to_bytes(32, "big")
        request = ReceiptRequest(self.served, self.bundle, TRANSCRIPT)
        before = snapshot(self.m)
        if self.phase is Phase.CLOSED:
            with pytest.raises(RuntimeError):
                self.m.request(request)
        elif self.pending and self.pending[-1][0] == self.served:
            self.m.request(request)  # asked already: the first bundle shown stays
        elif self.served == self.receipted:
            with pytest.raises(ValueError):
                self.m.request(request)
        else:
            self.m.request(request)
            self.pending.append((self.served, self.bundle))
            return
        assert snapshot(self.m) == before

    def model_accepts(self, counts: Counts) -> None:
        self.receipted = counts
        self.pending = [(c, h) for c, h in self.pending if not counts.covers(c)]
        self.received_at_signing = self.received

    # The client's prompts ----------------------------------------------------------

    @precondition(lambda self: self.connected)
    @rule(size=st.integers(0, 200))
    def prompt(self, size: int) -> None:
        if self.phase in (Phase.CLOSING, Phase.CLOSED):
            expected: str | None = "SESSION_CLOSING"
        elif self.phase is Phase.STREAMING:
            expected = "REQUEST_IN_PROGRESS"
        elif self.served != self.receipted:
            expected = "RECEIPT_OWED"
        elif (
            contract_cost(self.terms, self.served.input + size, self.served.output + 1)
            > self.terms.deposit
        ):
            expected = "BUDGET_EXHAUSTED"
        else:
            expected = None
        refusal = self.m.prompt_refusal()
        assert (refusal.code if refusal else None) == (
            None if expected == "BUDGET_EXHAUSTED" else expected
        )
        before = snapshot(self.m)
        try:
            self.m.start_reply(size)
        except MeterRefusal as refused:
            assert refused.code == expected
            assert snapshot(self.m) == before
            return
        assert expected is None, f"prompt of {size} accepted, expected {expected}"
        self.served = Counts(self.served.input + size, self.served.output)
        self.phase = Phase.STREAMING
        self.last_prompt = size

    # The node streams --------------------------------------------------------------

    @precondition(lambda self: self.connected)
    @rule(k=st.integers(1, 50), delivered=st.integers(0, 50))
    def send(self, k: int, delivered: int) -> None:
        if self.phase is Phase.STREAMING:
            window = self.cap - (self.served.output - self.receipted.output)
            budget = most_output(self.terms, self.served.input) - self.served.output
            expected = max(0, min(k, window, budget))
        else:
            expected = 0
        sent = 0
        while sent < k and self.m.may_send():
            token_id = len(self.token_ids) * 7 + 3
            index = self.m.token_sent(token_id, f"<{token_id}>")
            self.token_ids.append(token_id)
            self.served = Counts(self.served.input, self.served.output + 1)
            assert index == self.served.output
            sent += 1
        assert sent == expected
        if sent < k and self.phase is Phase.STREAMING:
            full = self.served.output - self.receipted.output >= self.cap
            assert self.m.waiting_for_receipt() is full
        self.received += min(delivered, sent)  # the rest is still in flight

    @precondition(lambda self: self.connected and self.received < self.served.output)
    @rule(j=st.integers(1, 50))
    def deliver(self, j: int) -> None:
        self.received = min(self.served.output, self.received + j)

    @rule()
    def end_reply(self) -> None:
        self.m.end_reply()
        if self.phase is Phase.STREAMING:
            self.phase = Phase.IDLE

    @precondition(lambda self: self.connected)
    @rule(new_bundle=st.booleans(), every=st.integers(1, 20))
    def node_asks(self, new_bundle: bool, every: int) -> None:
        requested = self.pending[-1][0] if self.pending else self.receipted
        assert self.m.receipt_due(every) is (self.served.output - requested.output >= every)
        self.node_requests(new_bundle)

    # The client signs --------------------------------------------------------------

    @precondition(lambda self: self.connected and self.eligible())
    @rule(data=st.data())
    def client_signs(self, data: st.DataObject) -> None:
        self.client_signs_one(*data.draw(st.sampled_from(self.eligible())))

    def client_signs_one(self, counts: Counts, proof_hash: bytes) -> None:
        request = self.m.match(counts, proof_hash)
        assert request.counts == counts and request.proof_hash == proof_hash
        self.m.accept(request)
        self.model_accepts(counts)

    @precondition(lambda self: self.connected and self.served != self.receipted)
    @rule()
    def honest_round(self) -> None:
        """The usual exchange in one step: everything in flight arrives, the node asks for
        what it served, the client signs the newest request."""
        self.received = self.served.output
        self.node_requests(new_bundle=True)
        if self.pending:
            self.client_signs_one(*self.pending[-1])

    @rule(data=st.data())
    def hostile_signs(self, data: st.DataObject) -> None:
        """A receipt the node did not ask for: other counts, a stale or made-up bundle."""
        kind = data.draw(st.sampled_from(["any", "asked", "paid", "unasked"]))
        if kind == "asked" and self.pending:  # what was asked, with another bundle
            counts = data.draw(st.sampled_from([c for c, _ in self.pending]))
        elif kind == "paid":  # a replay of what is already receipted
            counts = self.receipted
        elif kind == "unasked":  # everything served, before the node asked for it
            counts = self.served
        else:
            counts = Counts(
                data.draw(st.integers(0, self.served.input + 3)),
                data.draw(st.integers(0, self.served.output + 3)),
            )
        known = [h for _, h in self.pending] + [self.bundle, b"\xee" * 32]
        proof_hash = data.draw(st.sampled_from(known))
        if (counts, proof_hash) in self.pending:
            proof_hash = b"\xee" * 32
        if self.phase is Phase.CLOSED:
            expected = "SESSION_CLOSED"
        elif any(c == counts for c, _ in self.pending):
            expected = "RECEIPT_MISMATCH"
        elif self.receipted.covers(counts):
            expected = "RECEIPT_UNEXPECTED"
        else:
            expected = "RECEIPT_MISMATCH"
        before = snapshot(self.m)
        with pytest.raises(MeterRefusal) as refused:
            self.m.match(counts, proof_hash)
        assert refused.value.code == expected
        assert snapshot(self.m) == before

    # Connections -------------------------------------------------------------------

    @precondition(lambda self: self.connected)
    @rule()
    def disconnect(self) -> None:
        before = snapshot(self.m)
        self.connected = False  # tokens in flight are lost to the client
        assert snapshot(self.m) == before

    @precondition(lambda self: not self.connected and self.phase in (Phase.IDLE, Phase.STREAMING))
    @rule(new_bundle=st.booleans())
    def resume(self, new_bundle: bool) -> None:
        """The node replays the unreceipted tail, then re-asks a receipt for ``served``."""
        self.connected = True
        assert self.received >= self.receipted.output
        replay = self.m.tail
        assert [t.index for t in replay] == list(
            range(self.receipted.output + 1, self.served.output + 1)
        )
        for token in replay:
            assert token.token_id == self.token_ids[token.index - 1]
        self.received = self.served.output
        if self.served != self.receipted:
            self.node_requests(new_bundle)

    # Closing -----------------------------------------------------------------------

    @precondition(lambda self: self.steps >= self.close_after)
    @rule()
    def begin_close(self) -> None:
        self.m.begin_close()
        if self.phase in (Phase.IDLE, Phase.STREAMING):
            self.phase = Phase.CLOSING

    @precondition(lambda self: self.steps >= self.close_after)
    @rule()
    def close(self) -> None:
        self.m.close()
        self.phase = Phase.CLOSED
        self.pending = []

    @precondition(lambda self: self.connected and self.phase is Phase.CLOSING and self.eligible())
    @rule(data=st.data())
    def final_receipt_races_close(self, data: st.DataObject) -> None:
        """The final receipt is matched, close() lands while it is stored, then accepted."""
        counts, proof_hash = data.draw(st.sampled_from(self.eligible()))
        request = self.m.match(counts, proof_hash)
        self.close()
        self.m.accept(request)
        self.receipted = counts
        self.received_at_signing = self.received

    # Invariants --------------------------------------------------------------------

    @invariant()
    def count_steps(self) -> None:
        self.steps += 1

    @invariant()
    def meter_matches_model(self) -> None:
        if self.meter is None:
            return
        m = self.m
        assert m.served == self.served
        assert m.receipted == self.receipted
        assert m.phase is self.phase
        assert [(r.counts, r.proof_hash) for r in m.pending] == self.pending
        assert [t.index for t in m.tail] == list(
            range(self.receipted.output + 1, self.served.output + 1)
        )
        assert [t.token_id for t in m.tail] == self.token_ids[self.receipted.output :]

    @invariant()
    def billing_rules_hold(self) -> None:
        if self.meter is None:
            return
        m = self.m
        assert m.served.output - m.receipted.output <= self.cap
        assert m.served.input - m.receipted.input <= self.last_prompt
        assert m.served.covers(m.receipted)
        assert m.receipted.covers(self.previous_receipted)
        self.previous_receipted = m.receipted
        assert m.receipted.output <= self.received_at_signing <= m.served.output
        assert self.received <= m.served.output
        assert self.terms.affordable(m.served)
        assert contract_cost(self.terms, m.served.input, m.served.output) <= self.terms.deposit

    @invariant()
    def output_left_is_exact(self) -> None:
        if self.meter is None:
            return
        m = self.m
        left = m.output_left()
        assert left == most_output(self.terms, m.served.input) - m.served.output
        assert contract_cost(self.terms, m.served.input, m.served.output + left) <= (
            self.terms.deposit
        )
        assert contract_cost(self.terms, m.served.input, m.served.output + left + 1) > (
            self.terms.deposit
        )
        unpaid = m.served.output - m.receipted.output
        assert m.may_send() is (self.phase is Phase.STREAMING and unpaid < self.cap and left > 0)

    @invariant()
    def closed_is_final(self) -> None:
        if self.meter is None or self.phase is not Phase.CLOSED:
            return
        m = self.m
        assert not m.may_send() and not m.waiting_for_receipt()
        assert m.pending == []
        with pytest.raises(RuntimeError):
            m.token_sent(0, "x")
        with pytest.raises(MeterRefusal) as refused:
            m.match(m.served, self.bundle)
        assert refused.value.code == "SESSION_CLOSED"
        refusal = m.prompt_refusal()
        assert refusal is not None and refusal.code == "SESSION_CLOSING"
        assert m.served == self.served  # the failed attempts changed nothing

    @invariant()
    def settlement_adds_up(self) -> None:
        if self.meter is None:
            return
        t, paid = self.terms, self.m.receipted
        split = settlement_split(
            t.deposit,
            paid.input,
            paid.output,
            t.input_price_per_mtok,
            t.output_price_per_mtok,
            FEE_BPS,
        )
        assert split.gross == contract_cost(t, paid.input, paid.output)
        assert split.host + split.fee + split.refund == t.deposit
        assert split.fee == split.gross * FEE_BPS // 10_000
        assert split.refund >= 0 and split.host >= 0


def test_meter_state_machine() -> None:
    run_state_machine_as_test(
        MeterMachine,
        settings=settings(max_examples=200, stateful_step_count=40, deadline=None),
    )
