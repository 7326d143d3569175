"""Chain URLs as they may be shown: scheme, host and port, nothing else.

Hosted RPC providers put the API key in the path, the query or the userinfo of the URL, so
any message that can reach a log line, an HTTP body or a frame names the endpoint only by
:func:`redact_url` (docs/architecture.md, threat model: a stranger).
"""

from __future__ import annotations

from urllib.parse import urlsplit

CHAIN_UNAVAILABLE = "chain unavailable"
"""All a frame sent before login says of a chain failure, and how ``/health``'s chain check
begins: never why (the why may quote the endpoint)."""


def redact_url(url: str) -> str:
    """``scheme://host[:port]`` of ``url``; a URL that does not parse shows as ``<chain URL>``.

    A plain name such as ``embedded`` is returned as is.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<chain URL>"
    if not parts.scheme or not parts.hostname:
        return url if url.isidentifier() else "<chain URL>"
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")
