"""The billing rules of one session, as a plain synchronous object.

A :class:`Meter` counts what the node has served (prompt tokens prefilled, reply tokens
sent) and what the session signer has receipted, and decides what may happen next: whether
another token may be sent, whether a receipt is due, whether a new prompt may start. The
connection drives it; nothing here awaits, so the rules are tested as tables of cases and
as a hypothesis state machine (tests/node/test_metering.py) without a WebSocket.

The rules (docs/protocol.md, "Billing"):

- never more than ``max_unreceipted`` reply tokens sent beyond the last receipt;
- a new prompt only when everything served is receipted, so at most one prompt's input
  tokens are ever unpaid;
- nothing served that the deposit cannot pay for at the session's two prices;
- once a settlement starts (``begin_close``) no token is sent and no prompt starts; the
  final receipt is still accepted until ``close``, after which nothing is.

A meter outlives its connection (the node keeps one per session), so reconnecting resets
nothing: a resumed session must first receipt what was streamed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from inferledger.chain.units import MTOK, cost


class Phase(StrEnum):
    """Where a session's billing stands."""

    IDLE = "idle"  # no reply streaming
    STREAMING = "streaming"  # a reply is being generated and sent
    CLOSING = "closing"  # a settlement is due: nothing more is served; the last receipt is awaited
    CLOSED = "closed"  # handed to the settlement worker: nothing more is served or accepted


_TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.IDLE: frozenset({Phase.STREAMING, Phase.CLOSING}),
    Phase.STREAMING: frozenset({Phase.IDLE, Phase.CLOSING}),
    Phase.CLOSING: frozenset({Phase.CLOSED}),
    Phase.CLOSED: frozenset(),
}


class MeterRefusal(Exception):
    """An action the billing rules refuse; ``code`` is the protocol error code to send."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, order=True, slots=True)
class Counts:
    """Cumulative input (prompt) and output (reply) tokens of a session."""

    input: int = 0
    output: int = 0

    def covers(self, other: Counts) -> bool:
        """Whether both counts are at least ``other``'s."""
        return self.input >= other.input and self.output >= other.output


@dataclass(frozen=True)
class Terms:
    """What a session pays with: its deposit and its two prices per million tokens."""

    deposit: int
    input_price_per_mtok: int
    output_price_per_mtok: int

    def __post_init__(self) -> None:
        # The contract refuses a served model with a zero output price, so no session has one.
        if self.output_price_per_mtok <= 0 or self.input_price_per_mtok < 0 or self.deposit < 0:
            raise ValueError(f"session terms out of range: {self}")

    def cost(self, counts: Counts) -> int:
        """What ``counts`` cost, rounded down once, exactly as JobMarketplace charges."""
        return cost(
            counts.input, counts.output, self.input_price_per_mtok, self.output_price_per_mtok
        )

    def affordable(self, counts: Counts) -> bool:
        return self.cost(counts) <= self.deposit


@dataclass(frozen=True)
class ReceiptRequest:
    """A receipt the node asked for: the counts it covers and what the signer commits to.

    ``proof_hash`` is the newest proof bundle's hash (it may cover fewer output tokens than
    the receipt pays for; the next bundle covers the rest); ``checkpoint`` is the node's
    record of that bundle, opaque here.
    """

    counts: Counts
    proof_hash: bytes
    transcript_hash: bytes
    checkpoint: object = None


@dataclass(frozen=True, slots=True)
class SentToken:
    """A reply token sent after the last receipt; replayed to a resuming client."""

    index: int
    token_id: int
    text: str


def settle_lead(configured: int, duration: int) -> int:
    """Seconds before expiry at which a session stops and settles: the configured lead,
    but never more than a tenth of the session, so a short session stays usable."""
    return min(configured, duration // 10)


@dataclass
class Meter:
    """One session's counters, pending receipt requests, unreceipted tail and phase.

    ``abandoned`` counts connections that left owing a receipt; the node settles a session
    that does so too often instead of waiting for it to come back.
    """

    terms: Terms
    max_unreceipted: int
    served: Counts = Counts()
    receipted: Counts = Counts()
    phase: Phase = Phase.IDLE
    pending: list[ReceiptRequest] = field(default_factory=list)
    tail: list[SentToken] = field(default_factory=list)
    abandoned: int = 0
    # (served.input, the output cap it leaves): the cap is asked for several times a token,
    # and only a new prompt changes it.
    _cap: tuple[int, int] = field(default=(-1, 0), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_unreceipted < 1:
            raise ValueError(f"max_unreceipted must be >= 1, got {self.max_unreceipted}")
        if not self.served.covers(self.receipted):
            raise ValueError(f"served {self.served} is behind receipted {self.receipted}")

    # What stands -------------------------------------------------------------------

    @property
    def unreceipted_output(self) -> int:
        return self.served.output - self.receipted.output

    @property
    def settled_up(self) -> bool:
        """Everything served is receipted."""
        return self.served == self.receipted

    @property
    def requested(self) -> Counts:
        """The counts of the newest receipt requested (or the receipted ones)."""
        return self.pending[-1].counts if self.pending else self.receipted

    def output_left(self) -> int:
        """Reply tokens the deposit still pays for, after what was served."""
        return max(0, self._output_cap() - self.served.output)

    def _output_cap(self) -> int:
        """The most reply tokens in all that the deposit pays for beside the prompt tokens
        served (rounded down once, as the contract charges)."""
        served_input, cap = self._cap
        if served_input != self.served.input:
            served_input = self.served.input
            room = (
                (self.terms.deposit + 1) * MTOK - 1 - served_input * self.terms.input_price_per_mtok
            )
            cap = room // self.terms.output_price_per_mtok
            self._cap = (served_input, cap)
        return cap

    def may_send(self) -> bool:
        """Whether one more reply token may be sent now (else: wait for a receipt, or stop)."""
        return (
            self.phase is Phase.STREAMING
            and self.unreceipted_output < self.max_unreceipted
            and self.output_left() > 0
        )

    def waiting_for_receipt(self) -> bool:
        """Streaming, but held back until the client signs: the window is full."""
        return self.phase is Phase.STREAMING and self.unreceipted_output >= self.max_unreceipted

    def receipt_due(self, every: int) -> bool:
        """Whether to ask for a receipt now: ``every`` output tokens since the last request."""
        return self.served.output - self.requested.output >= every

    # Transitions -------------------------------------------------------------------

    def _move(self, to: Phase) -> None:
        if to not in _TRANSITIONS[self.phase]:
            raise RuntimeError(f"meter cannot go from {self.phase} to {to}")
        self.phase = to

    def prompt_refusal(self) -> MeterRefusal | None:
        """Why no prompt may start now, or None."""
        if self.phase in (Phase.CLOSING, Phase.CLOSED):
            return MeterRefusal(
                "SESSION_CLOSING", "the session is being settled; open a new session"
            )
        if self.phase is Phase.STREAMING:
            return MeterRefusal(
                "REQUEST_IN_PROGRESS", "a reply is still streaming; wait for its done frame"
            )
        if not self.settled_up:
            return MeterRefusal(
                "RECEIPT_OWED",
                f"sign the receipt for {self.served.input} input and {self.served.output} "
                "output tokens before the next prompt",
            )
        return None

    def start_reply(self, prompt_tokens: int) -> None:
        """A prompt of ``prompt_tokens`` input tokens is about to be prefilled."""
        if prompt_tokens < 0:
            raise ValueError(f"prompt_tokens must be >= 0, got {prompt_tokens}")
        refusal = self.prompt_refusal()
        if refusal is not None:
            raise refusal
        after = Counts(self.served.input + prompt_tokens, self.served.output + 1)
        if not self.terms.affordable(after):
            raise MeterRefusal(
                "BUDGET_EXHAUSTED",
                f"a prompt of {prompt_tokens} tokens and one reply token cost "
                f"{self.terms.cost(after) - self.terms.cost(self.served)} base units; the deposit "
                f"has {self.terms.deposit - self.terms.cost(self.served)} left: open a new session",
            )
        self.served = Counts(after.input, self.served.output)
        self._move(Phase.STREAMING)

    def token_sent(self, token_id: int, text: str) -> int:
        """Count one reply token as sent (only allowed when ``may_send``); its index."""
        if not self.may_send():
            raise RuntimeError(f"no token may be sent now ({self.phase}, {self.served})")
        index = self.served.output + 1
        self.served = Counts(self.served.input, index)
        self.tail.append(SentToken(index, token_id, text))
        return index

    def end_reply(self) -> None:
        """The reply finished or was stopped (a closing session stays closing)."""
        if self.phase is Phase.STREAMING:
            self._move(Phase.IDLE)

    def request(self, request: ReceiptRequest) -> None:
        """Record a receipt request; it must cover everything served and be new."""
        if request.counts != self.served:
            raise ValueError(f"a receipt request must cover {self.served}, not {request.counts}")
        if self.phase is Phase.CLOSED:
            raise RuntimeError("no receipt is requested after the session closed")
        if self.pending and self.pending[-1].counts == request.counts:
            return  # already asked: the client signs what it was first shown
        if request.counts == self.receipted:
            raise ValueError(f"{request.counts} is already receipted")
        self.pending.append(request)

    def match(self, counts: Counts, proof_hash: bytes) -> ReceiptRequest:
        """The request a receipt for ``counts`` answers, or the refusal; changes nothing, so
        the caller checks the signature and stores the receipt before ``accept``."""
        if self.phase is Phase.CLOSED:
            raise MeterRefusal(
                "SESSION_CLOSED", "the session is settled; this receipt can no longer be paid"
            )
        match = next((r for r in self.pending if r.counts == counts), None)
        if match is None:
            asked = ", ".join(f"{r.counts.input}/{r.counts.output}" for r in self.pending)
            code = "RECEIPT_UNEXPECTED" if self.receipted.covers(counts) else "RECEIPT_MISMATCH"
            raise MeterRefusal(
                code,
                f"receipt for {counts.input} input / {counts.output} output tokens, but the node "
                f"asked for {asked or 'none'} (input/output)",
            )
        if match.proof_hash != proof_hash:
            raise MeterRefusal(
                "RECEIPT_MISMATCH",
                f"receipt for {counts.input}/{counts.output} tokens carries another proof hash",
            )
        return match

    def accept(self, request: ReceiptRequest) -> None:
        """The receipt answering ``request`` is signed and stored: it is what gets paid.
        Older requests and the tail it covers are dropped, since receipts are cumulative."""
        if request not in self.pending and self.phase is not Phase.CLOSED:
            raise ValueError(f"no pending request for {request.counts}")
        if not request.counts.covers(self.receipted):
            return  # a stale receipt stored after close: it never lowers what is paid
        counts = request.counts
        self.receipted = counts
        self.pending = [r for r in self.pending if not counts.covers(r.counts)]
        # The tail runs in index order: drop the tokens the receipt covers from its front.
        tail, covered = self.tail, 0
        while covered < len(tail) and tail[covered].index <= counts.output:
            covered += 1
        self.tail = tail[covered:]  # a new list: a writer thread may hold the old one

    def begin_close(self) -> None:
        """A settlement is due: stop serving; the final receipt may still arrive."""
        if self.phase in (Phase.IDLE, Phase.STREAMING):
            self._move(Phase.CLOSING)

    def close(self) -> None:
        """Hand over to the settlement worker: no further receipts are accepted."""
        self.begin_close()
        if self.phase is Phase.CLOSING:
            self._move(Phase.CLOSED)
        self.pending.clear()
