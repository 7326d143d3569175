"""keccak256 for the hot paths (receipts, the transcript chain), in C.

``eth_utils.keccak`` checks and converts its argument on every call, and the pycryptodome
object it builds costs more than hashing the few dozen bytes of a receipt or of a
transcript step (one per streamed token, on both sides). ``sha3`` (safe-pysha3) hashes
them in about a microsecond; the result is the same keccak256.
"""

from __future__ import annotations

import sha3


def keccak256(data: bytes) -> bytes:
    """The 32-byte keccak256 of ``data``."""
    return bytes(sha3.keccak_256(data).digest())
