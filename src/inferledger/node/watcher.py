"""The chain watcher: close requests and settlements from the marketplace's logs.

Each poll reads the head block and the ``CloseRequested``/``SessionSettled`` logs of the
blocks since the last poll, from a cursor kept in the node's state, so the RPC calls per
poll do not grow with the number of open sessions, and a node that was down picks up the
close requests it missed. Expiries need no chain call: the node knows each session's terms.

A reorganisation is noticed when the cursor's block is no longer the chain's block at that
height (or the chain is shorter): the watcher then rescans ``rescan_depth`` blocks below the
cursor and says so, so the worker re-checks its recent settlements against the chain.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from inferledger.chain.contracts import Marketplace, SessionEvent
from inferledger.chain.errors import ChainError, translate
from inferledger.node.state import NodeState

log = logging.getLogger("inferledger.node")

MAX_LOG_RANGE = 2_000
"""Blocks per ``eth_getLogs`` call; public RPC endpoints refuse much larger ranges."""


@dataclass(frozen=True)
class Poll:
    """What one poll saw: the head, its time, the session logs, and whether it reorganised."""

    head: int
    head_hash: str
    timestamp: int
    events: list[SessionEvent] = field(default_factory=list)
    reorganised: bool = False


class ChainWatcher:
    """Reads session logs block range by block range from ``start_block`` on."""

    def __init__(
        self, marketplace: Marketplace, state: NodeState, *, start_block: int, rescan_depth: int
    ) -> None:
        self.marketplace = marketplace
        self.state = state
        self.start_block = start_block
        self.rescan_depth = max(1, rescan_depth)

    def poll(self) -> Poll:
        """The head and the session logs since the cursor; raises ChainError when the chain
        cannot be read. The cursor moves only with ``advance``."""
        try:
            return self._poll()
        except ChainError:
            raise
        except Exception as exc:
            raise translate(exc, "watch the chain", self.marketplace.chain.url) from exc

    def _poll(self) -> Poll:
        w3 = self.marketplace.chain.w3
        head = w3.eth.get_block("latest")
        number, head_hash = int(head["number"]), head["hash"].to_0x_hex()
        cursor = self.state.chain_cursor()
        first, reorganised = self.start_block, False
        if cursor is not None:
            block, block_hash = cursor
            reorganised = number < block or (
                (head_hash if number == block else w3.eth.get_block(block)["hash"].to_0x_hex())
                != block_hash
            )
            if reorganised:
                first = max(self.start_block, min(block, number) - self.rescan_depth + 1)
                log.warning(
                    "chain watcher: the chain reorganised below block %s (head now %s); "
                    "rescanning from block %s and re-checking recent settlements",
                    block,
                    number,
                    first,
                )
            else:
                first = block + 1
        events: list[SessionEvent] = []
        for start in range(first, number + 1, MAX_LOG_RANGE):
            events += self.marketplace.session_events(start, min(number, start + MAX_LOG_RANGE - 1))
        return Poll(number, head_hash, int(head["timestamp"]), events, reorganised)

    def advance(self, poll: Poll) -> None:
        """Move the cursor past ``poll`` once its events are handled (a failure in between
        rescans them next time; handling them twice is harmless)."""
        self.state.set_chain_cursor(poll.head, poll.head_hash)
