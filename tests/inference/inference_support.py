"""Helpers shared by the inference tests."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from inferledger.inference.base import Event, Finish, Hidden, Token


def collect(events: Iterator[Event]) -> tuple[list[Token], Finish]:
    """Drain a stream, checking it ends with exactly one Finish."""
    tokens, finish, _ = collect_with_states(events)
    return tokens, finish


def collect_with_states(events: Iterator[Event]) -> tuple[list[Token], Finish, np.ndarray | None]:
    """Drain a stream and stack its Hidden rows, checking their order against the tokens.

    Each position arrives once, in order, and the row that sampled token ``j`` (position
    ``prompt + j - 1``) arrives before the token itself.
    """
    tokens: list[Token] = []
    rows: list[np.ndarray] = []
    covered = 0
    finish: Finish | None = None
    for event in events:
        assert finish is None, "no event may follow Finish"
        if isinstance(event, Finish):
            finish = event
        elif isinstance(event, Hidden):
            assert event.start == covered, f"rows start at {event.start}, expected {covered}"
            assert event.rows.dtype == np.float32
            rows.append(event.rows)
            covered += len(event.rows)
        else:
            assert isinstance(event, Token)
            tokens.append(event)
            if rows:
                assert covered >= len(tokens), "a token arrived before the row that sampled it"
    assert finish is not None, "stream ended without Finish"
    if not rows:
        return tokens, finish, None
    assert covered == (finish.prompt_tokens or 0) + len(tokens), "not every position has a row"
    return tokens, finish, np.concatenate(rows)
