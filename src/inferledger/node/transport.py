"""Whether a node URL is served over TLS, for `inferledger host register`/`update` and the
doctor's registration line: one classification, so the two never disagree.

Pure functions over the URL string (no network, no chain): the caller says whether the
chain is a dev chain, where plain loopback URLs are the norm and nothing is worth a warning.
"""

from __future__ import annotations

import ipaddress
from typing import Literal
from urllib.parse import urlsplit

Transport = Literal["tls", "plain", "loopback-plain"]
"""``tls``: https:// or wss://; ``plain``: anything else; ``loopback-plain``: plain, on a
loopback host (127.0.0.0/8, ::1, localhost), which only this machine can reach."""

TLS_SCHEMES = frozenset({"https", "wss"})
TLS_DOC = 'docs/operators.md, "Serving over TLS"'


def url_transport(url: str) -> Transport:
    """How clients would reach ``url``: over TLS, or in the clear (on loopback or not).

    Any scheme other than https/wss counts as plain: clients refuse it anyway
    (``sdk.wire.ws_endpoint``), and it certainly is not TLS.
    """
    parts = urlsplit(url.strip())
    if parts.scheme.lower() in TLS_SCHEMES:
        return "tls"
    return "loopback-plain" if _is_loopback(parts.hostname) else "plain"


def tls_warning(url: str, *, dev_chain: bool) -> str | None:
    """What is wrong with registering ``url`` on this chain, without the URL itself (the
    caller names it); None on a dev chain or for a TLS URL.

    A plain URL still works (sessions are end-to-end encrypted), so this is a warning,
    never a refusal.
    """
    kind = url_transport(url)
    if dev_chain or kind == "tls":
        return None
    if kind == "loopback-plain":
        return (
            "a loopback address, which clients of a non-dev chain cannot reach: register the "
            "node's public https:// URL, served behind a TLS reverse proxy; see " + TLS_DOC
        )
    return (
        f"{_plain(url)}: traffic metadata and the session handshake travel "
        "unprotected by TLS; sessions are end-to-end encrypted, but the URL should be "
        "https://, served behind a TLS reverse proxy; see " + TLS_DOC
    )


def transport_note(url: str, *, dev_chain: bool) -> str:
    """The doctor's parenthesis after the registered URL: TLS or plain, and the warning when
    a plain URL is registered on a non-dev chain."""
    warning = tls_warning(url, dev_chain=dev_chain)
    if warning is not None:
        return f"(warning: {warning})"
    if url_transport(url) == "tls":
        return "(TLS: clients connect with wss://)"
    return f"({_plain(url)}, no TLS: fine on a dev chain)"


def _plain(url: str) -> str:
    """``plain http://`` or ``plain ws://``; a URL with any other scheme is named as such."""
    scheme = urlsplit(url.strip()).scheme.lower()
    return f"plain {scheme}://" if scheme in ("http", "ws") else "not an https:// or wss:// URL"


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    host = host.rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
