"""The sealed channel inside a session's WebSocket (docs/protocol.md, "Encryption").

Both sides draw an ephemeral X25519 key per connection. The node's is in the challenge,
signed by the host key, so a relay cannot swap it; the client's is in ``key_share``. Their
shared secret, bound by HKDF-SHA256 to a transcript of the challenge (chain, marketplace,
host, nonce, both keys), gives one ChaCha20-Poly1305 key per direction. Every later frame
is one binary WebSocket message, ``ciphertext || tag``, under a nonce that is the frame's
position in its direction: a frame altered, replayed, dropped or reordered in transit does
not open, and the channel is then dead (the session itself is not; reconnect).

Keys are ephemeral on both sides, so a host key stolen later reads no recorded session.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

LABEL = b"inferledger/channel/v1"
KEY_BYTES = 32
TAG_BYTES = 16
_MAX_FRAMES = 2**64  # a direction's counter is a uint64 in the nonce


class SealBroken(Exception):
    """A sealed frame did not open: altered, replayed, dropped or reordered in transit, or
    sealed under other keys. The channel is unusable after it."""


@dataclass(frozen=True)
class ChannelKeys:
    """The two AEAD keys of one connection, one per direction."""

    to_node: bytes
    to_client: bytes


def transcript_hash(
    chain_id: int, marketplace: str, host: str, nonce: bytes, node_key: bytes, client_key: bytes
) -> bytes:
    """SHA-256 over what both sides agreed: the HKDF salt, so keys from one handshake are
    useless in any other (another chain, marketplace, host, nonce or key)."""
    parts = (
        LABEL,
        chain_id.to_bytes(32, "big"),
        _address(marketplace),
        _address(host),
        _exactly(nonce, 32, "nonce"),
        _exactly(node_key, KEY_BYTES, "node key"),
        _exactly(client_key, KEY_BYTES, "client key"),
    )
    return hashlib.sha256(b"".join(parts)).digest()


def derive_keys(shared_secret: bytes, transcript: bytes) -> ChannelKeys:
    """HKDF-SHA256(ikm=shared secret, salt=transcript, info=LABEL + " keys"), 64 bytes:
    the first 32 seal client-to-node frames, the last 32 node-to-client frames."""
    okm = HKDF(
        algorithm=hashes.SHA256(), length=2 * KEY_BYTES, salt=transcript, info=LABEL + b" keys"
    ).derive(shared_secret)
    return ChannelKeys(to_node=okm[:KEY_BYTES], to_client=okm[KEY_BYTES:])


class KeyPair:
    """An ephemeral X25519 key: one per connection, never stored."""

    def __init__(self, private: X25519PrivateKey | None = None) -> None:
        self._private = private or X25519PrivateKey.generate()
        self.public = self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> KeyPair:
        """A fixed key, for test vectors."""
        return cls(X25519PrivateKey.from_private_bytes(raw))

    def agree(self, peer_public: bytes) -> bytes:
        """The X25519 shared secret with ``peer_public``; ValueError for a key that is not
        32 bytes or a low-order point (whose secret would be all zeros)."""
        peer = X25519PublicKey.from_public_bytes(_exactly(peer_public, KEY_BYTES, "peer key"))
        return self._private.exchange(peer)


def agree_channel(
    own: KeyPair,
    peer_key: bytes,
    side: Literal["node", "client"],
    *,
    chain_id: int,
    marketplace: str,
    host: str,
    nonce: bytes,
) -> Channel:
    """One side's channel: the X25519 secret with ``peer_key``, HKDF-bound to the transcript
    of this handshake (the node's key and the client's in their places). ValueError for an
    unusable ``peer_key``."""
    node_key, client_key = (own.public, peer_key) if side == "node" else (peer_key, own.public)
    transcript = transcript_hash(chain_id, marketplace, host, nonce, node_key, client_key)
    keys = derive_keys(own.agree(peer_key), transcript)
    return Channel.for_node(keys) if side == "node" else Channel.for_client(keys)


def _nonce(counter: int) -> bytes:
    return bytes(4) + counter.to_bytes(8, "big")


class Channel:
    """One side's sealing and opening state. ``seal`` and ``open`` must be called in wire
    order (the node seals under its send lock)."""

    def __init__(self, send_key: bytes, receive_key: bytes) -> None:
        self._send = ChaCha20Poly1305(send_key)
        self._receive = ChaCha20Poly1305(receive_key)
        self.sent = 0  # frames sealed so far: the next one's nonce
        self.received = 0  # frames opened so far
        self.broken = False

    @classmethod
    def for_client(cls, keys: ChannelKeys) -> Channel:
        return cls(keys.to_node, keys.to_client)

    @classmethod
    def for_node(cls, keys: ChannelKeys) -> Channel:
        return cls(keys.to_client, keys.to_node)

    def seal(self, plaintext: bytes) -> bytes:
        if self.sent >= _MAX_FRAMES:
            raise SealBroken("this connection sealed 2**64 frames: reconnect")
        sealed = self._send.encrypt(_nonce(self.sent), plaintext, None)
        self.sent += 1
        return sealed

    def open(self, sealed: bytes | str) -> bytes:
        """The plaintext of the next frame in order, or SealBroken."""
        if self.broken:
            raise SealBroken("the channel already failed; reconnect")
        if isinstance(sealed, str):
            self.broken = True
            raise SealBroken(f"frame {self.received} arrived as plaintext on an encrypted session")
        try:
            plaintext = self._receive.decrypt(_nonce(self.received), sealed, None)
        except InvalidTag:
            self.broken = True
            raise SealBroken(
                f"frame {self.received} failed authentication: altered, replayed, dropped or "
                "reordered in transit"
            ) from None
        self.received += 1
        return plaintext


def _address(value: str) -> bytes:
    raw = bytes.fromhex(value[2:] if value[:2] in ("0x", "0X") else value)
    return _exactly(raw, 20, "address")


def _exactly(raw: bytes, length: int, what: str) -> bytes:
    if len(raw) != length:
        raise ValueError(f"{what} must be {length} bytes, got {len(raw)}")
    return raw
