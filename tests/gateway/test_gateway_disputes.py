"""gateway_auto_dispute: a checkpoint whose background re-run failed is disputed once its
session settles, once, and retried if the dispute cannot be opened. The SDK's dispute calls
are faked here (they have their own tests on both chains, tests/verifier/test_service.py);
what is under test is when the gateway calls them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from inferledger.gateway.disputes import AutoDisputes
from inferledger.sdk import SdkError


class FakeVerifier:
    def __init__(self, failed: dict[int, int]) -> None:
        self.failed = failed

    def failures(self) -> dict[int, int]:
        return dict(self.failed)


@dataclass
class Record:
    session_id: int
    host: str = "0xhost"
    settlement: dict[str, Any] | None = None


@dataclass
class FakeDisputes:
    refuse: set[int] = field(default_factory=set)
    opened: list[tuple[int, int]] = field(default_factory=list)

    def open(self, record: Record, index: int) -> int:
        if record.session_id in self.refuse:
            raise SdkError("cannot open the dispute: the RPC is down")
        self.opened.append((record.session_id, index))
        return len(self.opened)

    def draw(self, dispute_id: int) -> list[str]:
        return ["0xa", "0xb", "0xc"]

    def deliver(self, dispute_id: int, record: Record) -> list[Any]:
        return []


class FakeSessions:
    def __init__(self, settled: set[int]) -> None:
        self.settled = settled

    def refresh(self, session_id: int) -> Record:
        status = "settled" if session_id in self.settled else "open"
        return Record(session_id, settlement={"status": status} if status == "settled" else None)


class FakeClient:
    def __init__(self, settled: set[int]) -> None:
        self.sessions = FakeSessions(settled)
        self.disputes = FakeDisputes()


def test_a_failed_checkpoint_is_disputed_once_after_its_session_settles() -> None:
    client = FakeClient(settled=set())
    auto = AutoDisputes(client, FakeVerifier({7: 3}), CollectorRegistry())  # type: ignore[arg-type]
    assert auto.sweep() == []  # still open: disputes judge settled sessions
    client.sessions.settled.add(7)
    assert auto.sweep() == [1]
    assert client.disputes.opened == [(7, 3)]  # the host's bundle index
    assert auto.sweep() == []  # never twice
    assert auto.opened._value.get() == 1


def test_a_dispute_that_cannot_be_opened_is_retried_at_the_next_sweep() -> None:
    client = FakeClient(settled={5})
    client.disputes.refuse.add(5)
    auto = AutoDisputes(client, FakeVerifier({5: 1}), CollectorRegistry())  # type: ignore[arg-type]
    assert auto.sweep() == []
    assert auto.failed._value.get() == 1
    client.disputes.refuse.clear()
    assert auto.sweep() == [1]
