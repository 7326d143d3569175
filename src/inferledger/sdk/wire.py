"""The client side of the session protocol over a WebSocket.

It logs in with the session signer, streams replies, and answers each receipt
request only after checking that the token count and the transcript hash match
what it actually received: a node cannot get a receipt for tokens it did not send.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import websockets
from eth_account import Account
from eth_account.signers.local import LocalAccount

from inferledger.chain.receipts import (
    Receipt,
    ReceiptDomain,
    SessionAuth,
    sign_receipt,
    sign_session_auth,
)
from inferledger.proofs.transcript import TranscriptHash


class SessionError(Exception):
    """The node answered with an error frame, or broke the protocol."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class StreamedToken:
    index: int
    token_id: int
    text: str


@dataclass
class Reply:
    """One finished reply."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    prompt_tokens: int = 0
    session_tokens: int = 0


def _hex(raw: bytes) -> str:
    return "0x" + raw.hex()


class SessionClient:
    """A logged-in session connection; use ``SessionClient.connect``."""

    def __init__(
        self,
        ws: Any,
        session_id: int,
        signer: LocalAccount,
        domain: ReceiptDomain,
        ready: dict[str, Any],
        transcript: TranscriptHash,
    ) -> None:
        self.ws = ws
        self.session_id = session_id
        self.signer = signer
        self.domain = domain
        self.ready = ready
        self.transcript = transcript
        self.received = int(ready["tokens_receipted"])
        self.receipted = self.received
        self.last_done: dict[str, Any] | None = None

    @classmethod
    async def connect(
        cls,
        url: str,
        session_id: int,
        signer_key: bytes | str,
        *,
        transcript: TranscriptHash | None = None,
        max_size: int = 2**20,
    ) -> SessionClient:
        """Open ``url`` (``ws://host:port/v1/ws``) and log in to ``session_id``.

        Pass the ``transcript`` kept from an earlier connection to resume a session.
        """
        signer = Account.from_key(signer_key)
        ws = await websockets.connect(url, max_size=max_size)
        try:
            challenge = json.loads(await ws.recv())
            _raise_if_error(challenge)
            domain = ReceiptDomain(int(challenge["chain_id"]), challenge["marketplace"])
            nonce = bytes.fromhex(challenge["nonce"][2:])
            auth = SessionAuth(session_id, nonce, challenge["host"])
            signature = sign_session_auth(signer.key, domain, auth)
            await ws.send(
                json.dumps(
                    {
                        "type": "session_init",
                        "session_id": session_id,
                        "nonce": challenge["nonce"],
                        "signature": _hex(signature),
                    }
                )
            )
            ready = json.loads(await ws.recv())
            _raise_if_error(ready)
        except BaseException:
            await ws.close()
            raise
        transcript = transcript or TranscriptHash(session_id)
        if _hex(transcript.value) != ready["transcript_hash"]:
            await ws.close()
            raise SessionError(
                "TRANSCRIPT_MISMATCH",
                "the node's transcript differs from ours: it claims tokens we never received",
            )
        return cls(ws, session_id, signer, domain, ready, transcript)

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def stream(
        self,
        messages: Sequence[dict[str, str]],
        *,
        request_id: str = "r1",
        **params: Any,
    ) -> AsyncIterator[StreamedToken]:
        """Send a prompt and yield its tokens; receipts are signed along the way."""
        await self.send(
            {"type": "prompt", "request_id": request_id, "messages": list(messages), **params}
        )
        while True:
            frame = json.loads(await self.ws.recv())
            kind = frame["type"]
            if kind == "token":
                self.received += 1
                self.transcript.update(int(frame["token_id"]))
                if frame["index"] != self.received:
                    raise SessionError("PROTOCOL", f"token index {frame['index']} out of order")
                yield StreamedToken(frame["index"], frame["token_id"], frame["text"])
            elif kind == "receipt_request":
                await self._answer(frame)
            elif kind == "done":
                self.last_done = frame
                return
            elif kind == "receipt_ack":
                self.receipted = max(self.receipted, int(frame["tokens"]))
            else:
                _raise_if_error(frame)

    async def chat(self, messages: Sequence[dict[str, str]], **params: Any) -> Reply:
        """Send a prompt and wait for the whole reply."""
        reply = Reply()
        async for token in self.stream(messages, **params):
            reply.text += token.text
            reply.token_ids.append(token.token_id)
        assert self.last_done is not None
        reply.finish_reason = self.last_done["finish_reason"]
        reply.prompt_tokens = self.last_done["prompt_tokens"]
        reply.session_tokens = self.last_done["session_tokens"]
        return reply

    async def _answer(self, request: dict[str, Any]) -> None:
        """Sign a receipt only for what we received, with the transcript we computed."""
        tokens = int(request["tokens"])
        if tokens != self.received:
            raise SessionError(
                "RECEIPT_REFUSED",
                f"node asks a receipt for {tokens} tokens; we got {self.received}",
            )
        if request["transcript_hash"] != _hex(self.transcript.value):
            raise SessionError("RECEIPT_REFUSED", "node's transcript hash differs from ours")
        proof_hash = bytes.fromhex(request["proof_hash"][2:])
        receipt = Receipt(self.session_id, tokens, proof_hash)
        signature = sign_receipt(self.signer.key, self.domain, receipt)
        await self.send(
            {
                "type": "receipt",
                "tokens": tokens,
                "proof_hash": request["proof_hash"],
                "signature": _hex(signature),
            }
        )

    async def end(self) -> dict[str, Any]:
        """Tell the node we are done; returns its ``session_end`` frame."""
        await self.send({"type": "end"})
        while True:
            frame = json.loads(await self.ws.recv())
            if frame["type"] == "receipt_request":
                await self._answer(frame)
            elif frame["type"] == "session_end":
                await self.ws.close()
                return frame
            elif frame["type"] != "receipt_ack":
                _raise_if_error(frame)

    async def close(self) -> None:
        await self.ws.close()


def _raise_if_error(frame: dict[str, Any]) -> None:
    if frame.get("type") == "error":
        raise SessionError(frame.get("code", "?"), frame.get("message", ""))
