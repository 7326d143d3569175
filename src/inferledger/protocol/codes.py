"""The error codes of the session protocol, and the exception that carries one.

docs/protocol.md lists every code with what it means and whether it is fatal; a test keeps
the list and this enum in step.
"""

from __future__ import annotations

from enum import StrEnum

PROTOCOL_VERSION = 5
"""5: the node may send several tokens in one ``tokens`` frame (4: the host signs the
challenge and every frame after ``key_share`` is sealed; 3: ``session_init`` carries the
session's bundle salt)."""


class ErrorCode(StrEnum):
    """Error codes sent in ``error`` frames. Fatal ones close the connection."""

    BAD_FRAME = "BAD_FRAME"
    UNKNOWN_TYPE = "UNKNOWN_TYPE"
    FRAME_TOO_LARGE = "FRAME_TOO_LARGE"
    NOT_AUTHENTICATED = "NOT_AUTHENTICATED"
    ALREADY_AUTHENTICATED = "ALREADY_AUTHENTICATED"
    BAD_NONCE = "BAD_NONCE"
    BAD_SIGNATURE = "BAD_SIGNATURE"
    SESSION_NOT_FOUND = "SESSION_NOT_FOUND"
    SESSION_CLOSED = "SESSION_CLOSED"
    WRONG_HOST = "WRONG_HOST"
    MODEL_NOT_SERVED = "MODEL_NOT_SERVED"
    SESSION_BUSY = "SESSION_BUSY"
    NODE_NOT_READY = "NODE_NOT_READY"
    LOGIN_TIMEOUT = "LOGIN_TIMEOUT"
    TOO_MANY_CONNECTIONS = "TOO_MANY_CONNECTIONS"
    TOO_MANY_REPLIES = "TOO_MANY_REPLIES"
    REQUEST_IN_PROGRESS = "REQUEST_IN_PROGRESS"
    RECEIPT_OWED = "RECEIPT_OWED"
    SESSION_CLOSING = "SESSION_CLOSING"
    BUDGET_EXHAUSTED = "BUDGET_EXHAUSTED"
    RECEIPT_INVALID = "RECEIPT_INVALID"
    RECEIPT_MISMATCH = "RECEIPT_MISMATCH"
    RECEIPT_UNEXPECTED = "RECEIPT_UNEXPECTED"
    RECEIPT_TIMEOUT = "RECEIPT_TIMEOUT"
    BAD_REQUEST = "BAD_REQUEST"
    CHAIN_UNAVAILABLE = "CHAIN_UNAVAILABLE"
    INTERNAL = "INTERNAL"
    BAD_SEAL = "BAD_SEAL"
    ENCRYPTION_REQUIRED = "ENCRYPTION_REQUIRED"


# Codes after which the node closes the connection; the session itself stays usable.
FATAL_CODES = frozenset(
    {
        ErrorCode.BAD_NONCE,
        ErrorCode.BAD_SIGNATURE,
        ErrorCode.SESSION_NOT_FOUND,
        ErrorCode.SESSION_CLOSED,
        ErrorCode.WRONG_HOST,
        ErrorCode.MODEL_NOT_SERVED,
        ErrorCode.SESSION_BUSY,
        ErrorCode.NODE_NOT_READY,
        ErrorCode.LOGIN_TIMEOUT,
        ErrorCode.TOO_MANY_CONNECTIONS,
        ErrorCode.RECEIPT_INVALID,
        ErrorCode.RECEIPT_MISMATCH,
        ErrorCode.RECEIPT_TIMEOUT,
        ErrorCode.BAD_SEAL,
        ErrorCode.ENCRYPTION_REQUIRED,
    }
)


class ProtocolError(Exception):
    """A frame or action the node refuses; becomes an ``error`` frame."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def fatal(self) -> bool:
        return self.code in FATAL_CODES
