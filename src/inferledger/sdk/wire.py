"""The client side of the session protocol over a WebSocket.

It logs in with the session signer, streams replies, and answers each receipt
request only after checking that the token count and the transcript hash match
what it actually received: a node cannot get a receipt for tokens it did not send.
After ``end`` the node settles on chain and reports the result in a ``settled``
frame, which ``wait_settlement`` awaits.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

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
from inferledger.chain.units import cost
from inferledger.proofs.transcript import TranscriptHash
from inferledger.sdk.errors import SdkError

WS_PATH = "/v1/ws"
SETTLEMENT_FRAMES = ("settled", "settlement_pending")


class SessionError(SdkError):
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
    """One finished reply; ``cost`` is what the whole session has cost so far (base units)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    prompt_tokens: int = 0
    session_tokens: int = 0
    cost: int = 0


@dataclass(frozen=True)
class SignedReceipt:
    """A receipt this client signed, with the transcript hash it checked first."""

    tokens: int
    proof_hash: bytes
    transcript_hash: bytes
    proof_uri: str | None
    signature: bytes


ReceiptHook = Callable[[SignedReceipt], None]


def _hex(raw: bytes) -> str:
    return "0x" + raw.hex()


def ws_endpoint(api_url: str) -> str:
    """The session WebSocket for a node URL: ``http://h:p`` -> ``ws://h:p/v1/ws``."""
    parts = urlsplit(api_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"node URL {api_url!r} is not http(s):// or ws(s)://")
    path = parts.path.rstrip("/")
    if not path.endswith(WS_PATH):
        path += WS_PATH
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def http_base(node_url: str) -> str:
    """The node's HTTP base URL (where ``proof_uri`` paths resolve) for a node URL."""
    parts = urlsplit(node_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/")
    if path.endswith(WS_PATH):
        path = path[: -len(WS_PATH)]
    return urlunsplit((scheme, parts.netloc, path, "", ""))


class SessionClient:
    """A logged-in session connection; use ``SessionClient.connect``.

    ``token_ids`` holds the ids received on this connection, after the
    ``start_tokens`` the node had already receipted when it was opened.
    """

    def __init__(
        self,
        ws: Any,
        session_id: int,
        signer: LocalAccount,
        domain: ReceiptDomain,
        ready: dict[str, Any],
        transcript: TranscriptHash,
        on_receipt: ReceiptHook | None = None,
    ) -> None:
        self.ws = ws
        self.session_id = session_id
        self.signer = signer
        self.domain = domain
        self.ready = ready
        self.transcript = transcript
        self.on_receipt = on_receipt
        self.price_per_mtok = int(ready.get("price_per_mtok", 0))
        self.received = int(ready["tokens_receipted"])
        self.start_tokens = self.received
        self.receipted = self.received
        self.tokens: list[StreamedToken] = []
        self.receipts: list[SignedReceipt] = []
        self.last_done: dict[str, Any] | None = None
        self.ended: dict[str, Any] | None = None
        self.settlement_frame: dict[str, Any] | None = None

    @classmethod
    async def connect(
        cls,
        url: str,
        session_id: int,
        signer_key: bytes | str,
        *,
        transcript: TranscriptHash | None = None,
        token_ids: Sequence[int] | None = None,
        on_receipt: ReceiptHook | None = None,
        max_size: int = 2**20,
        open_timeout: float = 10.0,
    ) -> SessionClient:
        """Open ``url`` (``ws://host:port/v1/ws``) and log in to ``session_id``.

        To resume, pass the session's ``token_ids`` received so far (or the ``transcript``
        kept from an earlier connection): the node continues from its last receipt, and
        the hash over our first ``tokens_receipted`` ids must equal the node's.
        """
        signer = Account.from_key(signer_key)
        ws = await websockets.connect(url, max_size=max_size, open_timeout=open_timeout)
        try:
            challenge = json.loads(await asyncio.wait_for(ws.recv(), open_timeout))
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
            ready = json.loads(await asyncio.wait_for(ws.recv(), open_timeout))
            _raise_if_error(ready)
            receipted = int(ready["tokens_receipted"])
            if token_ids is not None:
                if len(token_ids) < receipted:
                    raise SessionError(
                        "TRANSCRIPT_MISMATCH",
                        f"the node holds a receipt for {receipted} tokens; we received "
                        f"{len(token_ids)}",
                    )
                transcript = TranscriptHash(session_id)
                for token_id in token_ids[:receipted]:
                    transcript.update(token_id)
            transcript = transcript or TranscriptHash(session_id)
            if _hex(transcript.value) != ready["transcript_hash"]:
                raise SessionError(
                    "TRANSCRIPT_MISMATCH",
                    "the node's transcript differs from ours: it claims tokens we never received",
                )
        except BaseException:
            await ws.close()
            raise
        return cls(ws, session_id, signer, domain, ready, transcript, on_receipt)

    @property
    def is_open(self) -> bool:
        return self.ws.state is websockets.protocol.State.OPEN

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def _next(self) -> dict[str, Any]:
        """Read one frame and do its bookkeeping: count tokens, sign receipts, raise errors."""
        frame = json.loads(await self.ws.recv())
        kind = frame.get("type")
        if kind == "token":
            self.received += 1
            self.transcript.update(int(frame["token_id"]))
            if frame["index"] != self.received:
                raise SessionError("PROTOCOL", f"token index {frame['index']} out of order")
            self.tokens.append(StreamedToken(frame["index"], frame["token_id"], frame["text"]))
        elif kind == "receipt_request":
            await self._answer(frame)
        elif kind == "receipt_ack":
            self.receipted = max(self.receipted, int(frame["tokens"]))
        elif kind in SETTLEMENT_FRAMES:
            self.settlement_frame = frame
        else:
            _raise_if_error(frame)
        return frame

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
            frame = await self._next()
            kind = frame["type"]
            if kind == "token":
                yield self.tokens[-1]
            elif kind == "done":
                self.last_done = frame
                return

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
        reply.cost = cost(self.received, self.price_per_mtok)
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
        signed = SignedReceipt(
            tokens, proof_hash, self.transcript.value, request.get("proof_uri"), signature
        )
        if self.on_receipt is not None:
            self.on_receipt(signed)  # persisted before the node can use it
        self.receipts.append(signed)
        await self.send(
            {
                "type": "receipt",
                "tokens": tokens,
                "proof_hash": request["proof_hash"],
                "signature": _hex(signature),
            }
        )

    async def end(self) -> dict[str, Any]:
        """Tell the node we are done; returns its ``session_end`` frame.

        The connection stays open for the ``settled`` frame: see ``wait_settlement``.
        """
        await self.send({"type": "end"})
        while True:
            frame = await self._next()
            if frame["type"] == "session_end":
                self.ended = frame
                return frame

    async def wait_settlement(self, timeout: float) -> dict[str, Any] | None:
        """After ``end``: the node's ``settled`` or ``settlement_pending`` frame.

        None if neither arrives within ``timeout`` seconds or the connection closes first.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.settlement_frame is None:
            left = deadline - loop.time()
            if left <= 0:
                return None
            try:
                await asyncio.wait_for(self._next(), left)
            except (TimeoutError, websockets.ConnectionClosed):
                return None
        return self.settlement_frame

    async def close(self) -> None:
        await self.ws.close()


def _raise_if_error(frame: dict[str, Any]) -> None:
    if frame.get("type") == "error":
        raise SessionError(frame.get("code", "?"), frame.get("message", ""))
