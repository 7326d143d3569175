"""keccak256 for the hot paths (receipts, the transcript chain): pycryptodome's directly.

``eth_utils.keccak`` checks and converts its argument on every call, which costs more than
hashing the few dozen bytes of a receipt or a transcript step; this is the same function
(the one eth-hash itself runs here) without that, for bytes only.
"""

from __future__ import annotations

from Crypto.Hash import keccak as _keccak


def keccak256(data: bytes) -> bytes:
    """The 32-byte keccak256 of ``data``."""
    return _keccak.new(data=data, digest_bits=256).digest()
