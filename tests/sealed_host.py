"""The node's half of a session's sealed channel, for hand-written nodes in tests.

A hostile node (tests/sdk/test_wire.py) must speak the real handshake to reach the checks
after it: ``HostEnd`` sends a challenge signed by a host key, takes the client's
``key_share`` and then seals and opens frames exactly as the node does.
"""

from __future__ import annotations

import json
import os
from typing import Any

from eth_account.signers.local import LocalAccount
from websockets.exceptions import ConnectionClosed

from inferledger.chain.receipts import ReceiptDomain, sign_host_challenge
from inferledger.protocol.channel import Channel, KeyPair, agree_channel
from inferledger.protocol.codes import PROTOCOL_VERSION


class HostEnd:
    """One server-side connection; ``signer`` signs the challenge (the host, or an impostor)."""

    def __init__(self, ws: Any, signer: LocalAccount, domain: ReceiptDomain) -> None:
        self.ws = ws
        self.signer = signer
        self.domain = domain
        self.nonce = os.urandom(32)
        self.keys = KeyPair()
        self.channel: Channel | None = None

    async def start(self, host: str | None = None, **fields: Any) -> None:
        """Send the signed challenge (``fields`` override any of its fields), then read
        ``key_share`` and derive the channel."""
        host = host or self.signer.address
        signature = sign_host_challenge(self.signer.key, self.domain, self.nonce, self.keys.public)
        challenge = {
            "type": "challenge",
            "protocol": PROTOCOL_VERSION,
            "nonce": "0x" + self.nonce.hex(),
            "host": host,
            "chain_id": self.domain.chain_id,
            "marketplace": self.domain.marketplace,
            "model": "m",
            "node_key": "0x" + self.keys.public.hex(),
            "host_signature": "0x" + signature.hex(),
            **fields,
        }
        await self.ws.send(json.dumps(challenge))
        share = json.loads(await self.ws.recv())
        assert share["type"] == "key_share", share
        self.channel = agree_channel(
            self.keys,
            bytes.fromhex(share["client_key"][2:]),
            "node",
            chain_id=int(challenge["chain_id"]),
            marketplace=str(challenge["marketplace"]),
            host=host,
            nonce=self.nonce,
        )

    async def send(self, text: str) -> None:
        assert self.channel is not None
        await self.ws.send(self.channel.seal(text.encode()))

    async def recv(self) -> bytes:
        assert self.channel is not None
        return self.channel.open(await self.ws.recv())

    async def frames(self) -> list[dict[str, Any]]:
        """Every frame the client sends until it disconnects."""
        seen = []
        try:
            while True:
                seen.append(json.loads(await self.recv()))
        except ConnectionClosed:
            return seen
