"""The transcript hash: a hash chain over a session's generated token ids.

Node and client compute it independently; a receipt request whose hash differs
from the client's means they disagree on what was delivered.
"""

from __future__ import annotations

from inferledger.chain.keccak import keccak256

_TRANSCRIPT_DOMAIN = b"inferledger/transcript/v1"


class TranscriptHash:
    """A hash chain over a session's generated token ids.

    ``h0 = keccak(domain || session_id)``, ``h_i = keccak(h_(i-1) || token_id as int64)``.
    The client keeps the same chain over the tokens it received, so a receipt request
    whose hash differs means the node and the client disagree on what was delivered.
    """

    def __init__(self, session_id: int, start: bytes | None = None) -> None:
        self.value = start or keccak256(_TRANSCRIPT_DOMAIN + session_id.to_bytes(32, "big"))

    def update(self, token_id: int) -> bytes:
        self.value = keccak256(self.value + token_id.to_bytes(8, "big", signed=True))
        return self.value
