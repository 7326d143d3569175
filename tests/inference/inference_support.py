"""Helpers shared by the inference tests."""

from __future__ import annotations

from collections.abc import Iterator

from inferledger.inference.base import Event, Finish, Token


def collect(events: Iterator[Event]) -> tuple[list[Token], Finish]:
    """Drain a stream, checking it ends with exactly one Finish."""
    tokens: list[Token] = []
    finish: Finish | None = None
    for event in events:
        assert finish is None, "no event may follow Finish"
        if isinstance(event, Finish):
            finish = event
        else:
            assert isinstance(event, Token)
            tokens.append(event)
    assert finish is not None, "stream ended without Finish"
    return tokens, finish
