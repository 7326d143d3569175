"""The client's end of a session's sealed channel (docs/protocol.md, "Encryption").

``SealedSocket`` wraps a ``websockets`` connection with the same ``send``/``recv``/``close``
surface, sealing every frame after ``key_share``, so the rest of the SDK reads and writes
JSON text as if there were no encryption. ``start_channel`` runs the client's half of the
handshake once the challenge's host signature has been checked.
"""

from __future__ import annotations

import json
from typing import Any

from websockets.asyncio.client import ClientConnection

from inferledger.protocol.channel import Channel, KeyPair, SealBroken, agree_channel
from inferledger.protocol.server import Challenge


class SealedSocket:
    """A WebSocket whose frames are sealed (``channel`` set) or plain (dev chains only)."""

    def __init__(self, ws: ClientConnection, channel: Channel | None) -> None:
        self.ws = ws
        self.channel = channel

    @property
    def encrypted(self) -> bool:
        return self.channel is not None

    @property
    def state(self) -> Any:
        return self.ws.state

    async def send(self, text: str) -> None:
        if self.channel is None:
            await self.ws.send(text)
        else:
            await self.ws.send(self.channel.seal(text.encode()))

    async def recv(self) -> str | bytes:
        """The next frame's JSON; SealBroken if it does not open in order."""
        raw = await self.ws.recv()
        return raw if self.channel is None else self.channel.open(raw)

    async def close(self) -> None:
        await self.ws.close()


def client_handshake(challenge: Challenge) -> tuple[str, Channel]:
    """The ``key_share`` frame to send for a challenge already checked (its host signature
    included) and the channel it opens; SealBroken for an unusable node key."""
    keys = KeyPair()
    try:
        channel = agree_channel(
            keys,
            bytes.fromhex(challenge.node_key[2:]),
            "client",
            chain_id=challenge.chain_id,
            marketplace=challenge.marketplace,
            host=challenge.host,
            nonce=bytes.fromhex(challenge.nonce[2:]),
        )
    except ValueError as exc:
        raise SealBroken(f"the node's channel key is unusable: {exc}") from exc
    share = json.dumps({"type": "key_share", "client_key": "0x" + keys.public.hex()})
    return share, channel


async def start_channel(
    ws: ClientConnection, challenge: Challenge, *, plaintext: bool = False
) -> SealedSocket:
    """Send ``key_share`` and seal everything after it; ``plaintext`` skips it, for a node
    that offers that on a dev chain."""
    if plaintext:
        return SealedSocket(ws, None)
    share, channel = client_handshake(challenge)
    await ws.send(share)
    return SealedSocket(ws, channel)
