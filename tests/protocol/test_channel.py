"""The sealed channel by itself: the published test vectors, and what a relay's tampering
does to it (each kind of tampering is refused, and the channel is dead after it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eth_account import Account

from inferledger.chain.receipts import (
    ReceiptDomain,
    recover_host_challenge_signer,
    sign_host_challenge,
)
from inferledger.protocol.channel import (
    Channel,
    KeyPair,
    SealBroken,
    agree_channel,
    derive_keys,
    transcript_hash,
)

VECTORS = json.loads(
    (Path(__file__).resolve().parents[2] / "docs" / "channel-vectors.json").read_text()
)


def _hex(value: str) -> bytes:
    return bytes.fromhex(value[2:])


def test_the_published_vectors_are_what_the_code_computes() -> None:
    given = VECTORS["inputs"]
    host = Account.from_key(given["host_private_key"]).address
    node = KeyPair.from_private_bytes(_hex(given["node_private_key"]))
    client = KeyPair.from_private_bytes(_hex(given["client_private_key"]))
    domain = ReceiptDomain(given["chain_id"], given["marketplace"])
    nonce = _hex(given["nonce"])

    signature = sign_host_challenge(given["host_private_key"], domain, nonce, node.public)
    shared = node.agree(client.public)
    transcript = transcript_hash(
        domain.chain_id, domain.marketplace, host, nonce, node.public, client.public
    )
    keys = derive_keys(shared, transcript)

    assert host == VECTORS["host"]
    assert (node.public, client.public) == (_hex(VECTORS["node_key"]), _hex(VECTORS["client_key"]))
    assert signature == _hex(VECTORS["host_signature"])
    assert recover_host_challenge_signer(domain, nonce, node.public, signature) == host
    assert shared == client.agree(node.public) == _hex(VECTORS["shared_secret"])
    assert transcript == _hex(VECTORS["transcript_hash"])
    assert (keys.to_node, keys.to_client) == (
        _hex(VECTORS["key_to_node"]),
        _hex(VECTORS["key_to_client"]),
    )
    sender, receiver = Channel.for_client(keys), Channel.for_node(keys)
    for frame in VECTORS["client_frames"]:
        sealed = sender.seal(frame["plaintext"].encode())
        assert sealed == _hex(frame["sealed"])
        assert receiver.open(sealed) == frame["plaintext"].encode()
    for frame in VECTORS["node_frames"]:
        assert receiver.seal(frame["plaintext"].encode()) == _hex(frame["sealed"])


def _pair() -> tuple[Channel, Channel]:
    """Both ends as node and SDK build them (``agree_channel``), each from its own key."""
    node, client = KeyPair(), KeyPair()
    handshake = {"chain_id": 1, "marketplace": "0x" + "22" * 20, "host": "0x" + "33" * 20}
    handshake["nonce"] = bytes(32)
    return (
        agree_channel(client, node.public, "client", **handshake),
        agree_channel(node, client.public, "node", **handshake),
    )


def _tampered(kind: str, frames: list[bytes]) -> tuple[list[bytes | str], int]:
    """What a relay delivers instead of ``frames``, and how many of them are honest."""
    first, second, third = frames
    flipped = bytes([first[0] ^ 1]) + first[1:]
    return {
        "flipped": ([flipped], 0),
        "replayed": ([first, first], 1),
        "dropped": ([first, third], 1),
        "reordered": ([second, first], 0),
        "truncated": ([first[:-1]], 0),
        "text": (['{"type":"ping"}'], 0),
    }[kind]


@pytest.mark.parametrize(
    "kind", ["flipped", "replayed", "dropped", "reordered", "truncated", "text"]
)
def test_every_kind_of_tampering_fails_to_open_and_kills_the_channel(kind: str) -> None:
    client, node = _pair()
    frames = [client.seal(f'{{"type":"ping","n":{n}}}'.encode()) for n in range(3)]
    delivered, honest = _tampered(kind, frames)
    opened = []
    with pytest.raises(SealBroken):
        for frame in delivered:
            opened.append(node.open(frame))
    # Only the frames before the tampering opened, in order, and nothing opens after it.
    assert opened == [b'{"type":"ping","n":0}'] * honest
    with pytest.raises(SealBroken, match="already failed"):
        node.open(frames[0])


def test_keys_from_another_handshake_open_nothing() -> None:
    client, _node = _pair()
    _other_client, other_node = _pair()
    with pytest.raises(SealBroken):
        other_node.open(client.seal(b'{"type":"ping"}'))


def test_the_directions_have_their_own_keys() -> None:
    """A relay cannot reflect a client's frame back to it as the node's."""
    client, _node = _pair()
    with pytest.raises(SealBroken):
        client.open(client.seal(b'{"type":"pong"}'))


@pytest.mark.parametrize(
    "bad_key", [bytes(31), bytes(32)], ids=["short", "low-order (all-zero secret)"]
)
def test_an_unusable_peer_key_is_refused(bad_key: bytes) -> None:
    with pytest.raises(ValueError):
        KeyPair().agree(bad_key)
