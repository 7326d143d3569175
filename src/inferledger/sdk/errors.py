"""The SDK's errors: one base class, each message one line that says what to do.

Chain failures (unreachable RPC, reverts) keep their own ``ChainError`` family from
:mod:`inferledger.chain.errors`; catch ``(SdkError, ChainError)`` to handle everything.
"""

from __future__ import annotations


class SdkError(Exception):
    """Something the SDK refused or could not do; the message says why and the fix."""


class ConfigurationError(SdkError):
    """The client is missing a key or a deployment, or points at the wrong chain."""


class ConnectionLost(SdkError):
    """The node connection dropped mid-reply; the next call reconnects and resumes."""


class SessionClosed(SdkError):
    """The session was closed (or is closing) and takes no more prompts."""


class NodeUnreachable(SdkError):
    """The host's node did not answer at its URL."""
