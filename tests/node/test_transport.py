"""The TLS classification of node URLs that `host register`/`update` and doctor share."""

from __future__ import annotations

import pytest

from inferledger.node.transport import (
    TLS_DOC,
    tls_warning,
    transport_note,
    url_transport,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://node.example.com", "tls"),
        ("wss://node.example.com/v1/ws", "tls"),
        ("HTTPS://Node.Example.com:443", "tls"),
        ("WSS://node.example.com", "tls"),
        ("https://127.0.0.1:8443", "tls"),  # TLS is TLS, wherever it points
        ("http://node.example.com:8080", "plain"),
        ("ws://203.0.113.7:8080/v1/ws", "plain"),
        ("HTTP://NODE.EXAMPLE.COM", "plain"),
        ("http://[2001:db8::1]:8080", "plain"),
        ("ftp://node.example.com", "plain"),  # not TLS, whatever else it is
        ("node.example.com:8080", "plain"),
        ("http://127.0.0.1:8080", "loopback-plain"),
        ("ws://127.0.0.2:8080/v1/ws", "loopback-plain"),
        ("http://localhost:8080", "loopback-plain"),
        ("WS://LOCALHOST", "loopback-plain"),
        ("http://[::1]:8080", "loopback-plain"),
        ("  http://127.0.0.1:8080  ", "loopback-plain"),
    ],
)
def test_url_transport(url: str, expected: str) -> None:
    assert url_transport(url) == expected


@pytest.mark.parametrize(
    "url", ["http://node.example.com", "ws://127.0.0.1:8080", "https://node.example.com"]
)
def test_no_warning_on_a_dev_chain(url: str) -> None:
    assert tls_warning(url, dev_chain=True) is None


@pytest.mark.parametrize("url", ["https://node.example.com", "WSS://node.example.com/v1/ws"])
def test_no_warning_for_tls_on_a_public_chain(url: str) -> None:
    assert tls_warning(url, dev_chain=False) is None


@pytest.mark.parametrize(
    ("url", "scheme"), [("http://node.example.com", "http"), ("WS://n.io", "ws")]
)
def test_plain_url_on_a_public_chain_is_warned_about(url: str, scheme: str) -> None:
    warning = tls_warning(url, dev_chain=False)
    assert warning is not None
    assert warning.startswith(f"plain {scheme}://: ")
    for words in (
        "traffic metadata and the session handshake travel unprotected by TLS",
        "sessions are end-to-end encrypted",
        "https://, served behind a TLS reverse proxy",
        TLS_DOC,
    ):
        assert words in warning
    assert "\n" not in warning


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "ws://localhost", "http://[::1]:1"])
def test_loopback_url_on_a_public_chain_says_it_is_unreachable(url: str) -> None:
    warning = tls_warning(url, dev_chain=False)
    assert warning is not None
    assert "loopback address, which clients of a non-dev chain cannot reach" in warning
    assert "public https:// URL" in warning and TLS_DOC in warning


def test_transport_note() -> None:
    assert transport_note("https://n.io", dev_chain=False) == "(TLS: clients connect with wss://)"
    assert transport_note("https://n.io", dev_chain=True) == "(TLS: clients connect with wss://)"
    assert (
        transport_note("http://127.0.0.1:8080", dev_chain=True)
        == "(plain http://, no TLS: fine on a dev chain)"
    )
    plain = transport_note("http://n.io", dev_chain=False)
    assert plain == f"(warning: {tls_warning('http://n.io', dev_chain=False)})"
    assert plain.startswith("(warning: plain http://: traffic metadata")
