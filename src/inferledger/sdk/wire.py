"""The client side of the session protocol over a WebSocket.

It logs in with the session signer and signs only what it verified itself: the challenge
must name the chain, marketplace and host the client expects, signed by that host's key
(so nothing on the path can pose as the node), and every frame after it travels sealed
(``sdk.sealed``); a fresh session must start
at zero; a resumed one must match the client's own history (its token ids, the receipts
it signed, the input tokens it accepted); and every receipt request must equal the tokens
actually received and the transcript the client computed. A node therefore cannot get a
receipt for tokens it did not send, nor for prompt tokens beyond what the prompt could
hold (``prompt_token_bound``). After ``end`` the node settles on chain and reports the
result in a ``settled`` frame, which ``wait_settlement`` awaits through any
``settlement_pending`` frames (progress reports while the transaction is held up).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import websockets
from eth_account import Account
from eth_account.signers.local import LocalAccount

from inferledger.chain.receipts import (
    READ_SIGNATURE_HEADER,
    READ_TIMESTAMP_HEADER,
    Receipt,
    ReceiptDomain,
    SessionAuth,
    recover_host_challenge_signer,
    session_salt,
    sign_receipt,
    sign_session_auth,
    sign_session_read,
)
from inferledger.chain.units import cost
from inferledger.proofs.transcript import TranscriptHash
from inferledger.protocol.channel import SealBroken
from inferledger.protocol.client import prompt_token_bound
from inferledger.protocol.codes import PROTOCOL_VERSION
from inferledger.protocol.server import (
    SETTLEMENT_GAVE_UP,
    Challenge,
    Done,
    ErrorFrame,
    NodeFrameError,
    ReceiptAck,
    ReceiptRequest,
    ReplyStart,
    SessionEnd,
    SessionReady,
    Settled,
    SettlementPending,
    TokenFrame,
    TokensFrame,
    parse_node_frame,
    parse_node_frames,
)
from inferledger.sdk.errors import SdkError
from inferledger.sdk.sealed import SealedSocket, start_channel

WS_PATH = "/v1/ws"


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
    input_tokens: int = 0
    cost: int = 0


@dataclass(frozen=True)
class SignedReceipt:
    """A receipt this client signed, with the transcript hash it checked first."""

    input_tokens: int
    tokens: int
    proof_hash: bytes
    transcript_hash: bytes
    proof_uri: str | None
    signature: bytes


@dataclass(frozen=True)
class Expectation:
    """Who the client means to talk to: the deployment's receipt domain and the session's
    host (from the chain, not from the node). A challenge naming others is refused."""

    domain: ReceiptDomain
    host: str


@dataclass(frozen=True)
class History:
    """What the client itself knows of a session, to check a node's claims on resume.

    ``token_ids``: every output token received; ``input_tokens``: the input tokens it
    accepted (from ``reply_start`` frames); ``signed``: the (input, output) counts of the
    newest receipt it signed; ``reply_open``: a prompt was sent whose ``done`` never
    arrived (only then may the node have served tokens we did not see);
    ``unconfirmed_prompt_bound``: ``prompt_token_bound`` of that prompt if its
    ``reply_start`` never arrived either (0 if it did).
    """

    token_ids: tuple[int, ...] = ()
    input_tokens: int = 0
    signed: tuple[int, int] = (0, 0)
    reply_open: bool = False
    unconfirmed_prompt_bound: int = 0


ReceiptHook = Callable[[SignedReceipt], None]
PendingHook = Callable[[SettlementPending], None]


def _hex(raw: bytes) -> str:
    return "0x" + raw.hex()


def session_read_headers(
    signer_key: bytes | str, expect: Expectation, session_id: int, now: float | None = None
) -> dict[str, str]:
    """Headers that let the session signer read ``GET /v1/sessions/{id}`` for a minute: the
    node answers nobody else (docs/protocol.md, HTTP)."""
    timestamp = int(time.time() if now is None else now)
    signature = sign_session_read(signer_key, expect.domain, session_id, timestamp, expect.host)
    return {READ_TIMESTAMP_HEADER: str(timestamp), READ_SIGNATURE_HEADER: _hex(signature)}


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


def _refuse(message: str) -> SessionError:
    return SessionError("RECEIPT_REFUSED", message)


def check_challenge(challenge: Challenge, expect: Expectation) -> None:
    """The node must speak this protocol, for the host, chain and marketplace the client
    expects."""
    if challenge.protocol != PROTOCOL_VERSION:
        raise SessionError(
            "PROTOCOL",
            f"node speaks protocol {challenge.protocol}; this client speaks {PROTOCOL_VERSION}",
        )
    domain = expect.domain
    if challenge.chain_id != domain.chain_id:
        raise SessionError(
            "WRONG_DOMAIN", f"node says chain id {challenge.chain_id}; expected {domain.chain_id}"
        )
    if challenge.marketplace.lower() != domain.marketplace.lower():
        raise SessionError(
            "WRONG_DOMAIN",
            f"node says marketplace {challenge.marketplace}; expected {domain.marketplace}",
        )
    if challenge.host.lower() != expect.host.lower():
        raise SessionError(
            "WRONG_HOST",
            f"node says it is host {challenge.host}; the session's host is {expect.host}",
        )
    nonce, node_key = bytes.fromhex(challenge.nonce[2:]), bytes.fromhex(challenge.node_key[2:])
    signature = bytes.fromhex(challenge.host_signature[2:])
    try:
        signer = recover_host_challenge_signer(domain, nonce, node_key, signature)
    except Exception as exc:
        signer = f"nobody (the signature does not recover: {exc})"
    if signer.lower() != expect.host.lower():
        raise SessionError(
            "BAD_HOST_SIGNATURE",
            f"the challenge is signed by {signer}, not by the session's host {expect.host}: "
            "something between you and the node is posing as it; check the node's URL",
        )


def check_ready(ready: SessionReady, session_id: int, history: History) -> list[int]:
    """Check a node's account of the session against our own; the output token ids as
    they stand after the node's replay (ours, extended by tokens we missed)."""
    if ready.session_id != session_id:
        raise SessionError("PROTOCOL", f"node logged us in to session {ready.session_id}")
    receipted = (ready.receipted_input_tokens, ready.receipted_output_tokens)
    served = (ready.served_input_tokens, ready.served_output_tokens)
    if receipted[0] > history.signed[0] or receipted[1] > history.signed[1]:
        raise SessionError(
            "TRANSCRIPT_MISMATCH",
            f"node claims a receipt for {receipted[0]}/{receipted[1]} input/output tokens; "
            f"we signed only {history.signed[0]}/{history.signed[1]}",
        )
    if served[0] < receipted[0] or served[1] < receipted[1]:
        raise SessionError("PROTOCOL", "node says it served less than was receipted")
    indices = [t.index for t in ready.replay]
    if indices != list(range(receipted[1] + 1, served[1] + 1)):
        raise SessionError("PROTOCOL", "node's replay does not cover the unreceipted tokens")
    ids = list(history.token_ids[: receipted[1]])
    if len(ids) < receipted[1]:
        raise SessionError(
            "TRANSCRIPT_MISMATCH",
            f"node holds a receipt for {receipted[1]} tokens; we received {len(ids)}",
        )
    transcript = TranscriptHash(session_id)
    for token_id in ids:
        transcript.update(token_id)
    if _hex(transcript.value) != ready.transcript_hash:
        raise SessionError(
            "TRANSCRIPT_MISMATCH",
            "the node's transcript differs from ours: it claims tokens we never received",
        )
    if served[1] > len(history.token_ids) and not history.reply_open:
        raise _refuse(
            f"node says it served {served[1]} tokens; we received {len(history.token_ids)} and "
            "had no reply in flight"
        )
    for token in ready.replay:
        ours = history.token_ids[token.index - 1] if token.index <= len(history.token_ids) else None
        if ours is not None and ours != token.token_id:
            raise SessionError(
                "TRANSCRIPT_MISMATCH", f"node replays token {token.index} differently"
            )
        ids.append(token.token_id)
    new_input = served[0] - history.input_tokens
    if new_input > history.unconfirmed_prompt_bound:
        raise _refuse(
            f"node bills {served[0]} input tokens; we accepted {history.input_tokens} and sent "
            f"no prompt that could hold {new_input} more"
        )
    return ids


class SessionClient:
    """A logged-in session connection; use ``SessionClient.connect``.

    ``tokens`` holds the tokens received on this connection (replayed ones included),
    after the ``start_tokens`` the session had when it was opened.
    """

    def __init__(
        self,
        frames: _Frames,
        session_id: int,
        signer: LocalAccount,
        domain: ReceiptDomain,
        ready: SessionReady,
        token_ids: Sequence[int],
        start_tokens: int,
        on_receipt: ReceiptHook | None = None,
    ) -> None:
        self.frames = frames
        self.session_id = session_id
        self.signer = signer
        self.domain = domain
        self.ready = ready
        self.on_receipt = on_receipt
        self.input_price_per_mtok = ready.input_price_per_mtok
        self.output_price_per_mtok = ready.output_price_per_mtok
        self.transcript = TranscriptHash(session_id)
        for token_id in token_ids:
            self.transcript.update(token_id)
        self.received = len(token_ids)
        self.start_tokens = start_tokens
        self.input_tokens = ready.served_input_tokens  # input tokens we accept as billed
        self.receipted = (ready.receipted_input_tokens, ready.receipted_output_tokens)
        self.tokens: list[StreamedToken] = [
            StreamedToken(t.index, t.token_id, t.text)
            for t in ready.replay
            if t.index > start_tokens
        ]
        self.receipts: list[SignedReceipt] = []
        self.prompt_bound = 0  # prompt_token_bound of the prompt awaiting its reply_start
        self.reply_end: int | None = None  # the last token index the open reply may have
        self.last_done: Done | None = None
        self.ended: SessionEnd | None = None
        self.settled: Settled | None = None
        self.pending: list[SettlementPending] = []  # in order; the reasons the node gave

    @classmethod
    async def connect(
        cls,
        url: str,
        session_id: int,
        signer_key: bytes | str,
        *,
        expect: Expectation,
        history: History | None = None,
        on_receipt: ReceiptHook | None = None,
        max_size: int = 2**20,
        open_timeout: float = 10.0,
        plaintext: bool = False,
    ) -> SessionClient:
        """Open ``url`` (``ws://host:port/v1/ws``) and log in to ``session_id``.

        Without ``history`` the session must be fresh (nothing served, nothing receipted).
        To resume, pass what we know of it: the node's claims are checked against it, and
        the tokens it streamed after its last receipt are replayed so that we can check
        (or learn) them before signing for them. ``plaintext`` asks for an unencrypted
        session, which only a node on a dev chain that allows them grants.
        """
        history = history or History()
        signer = Account.from_key(signer_key)
        # No permessage-deflate: sealed frames are ciphertext, which does not compress, so
        # deflating every token frame would only burn CPU on both ends.
        raw = await websockets.connect(
            url, max_size=max_size, open_timeout=open_timeout, compression=None
        )
        ws = SealedSocket(raw, None)
        try:
            # Alone in its message: nothing may ride in plaintext with it.
            challenge = _expect(
                await asyncio.wait_for(_recv(ws, parse_node_frame), open_timeout),
                Challenge,
                "challenge",
            )
            check_challenge(challenge, expect)
            if plaintext and not challenge.plaintext:
                raise SessionError(
                    "ENCRYPTION_REQUIRED",
                    "this node takes only encrypted sessions; connect without plaintext",
                )
            ws = await start_channel(raw, challenge, plaintext=plaintext)
            frames = _Frames(ws)
            nonce = bytes.fromhex(challenge.nonce[2:])
            auth = SessionAuth(session_id, nonce, expect.host)
            signature = sign_session_auth(signer.key, expect.domain, auth)
            await ws.send(
                json.dumps(
                    {
                        "type": "session_init",
                        "session_id": session_id,
                        "nonce": challenge.nonce,
                        "signature": _hex(signature),
                        "salt": _hex(session_salt(signer.key, expect.domain, session_id)),
                    }
                )
            )
            ready = _expect(
                await asyncio.wait_for(frames.next(), open_timeout), SessionReady, "session_ready"
            )
            token_ids = check_ready(ready, session_id, history)
        except BaseException:
            await ws.close()
            raise
        start = min(len(history.token_ids), ready.served_output_tokens)
        return cls(frames, session_id, signer, expect.domain, ready, token_ids, start, on_receipt)

    async def settle_up(self) -> None:
        """On resume: sign for what the node served before the connection dropped (it
        takes no prompt until then). Returns at once for a session with nothing owed."""
        served = (self.ready.served_input_tokens, self.ready.served_output_tokens)
        while self.receipted != served:
            await self._next()

    @property
    def ws(self) -> SealedSocket:
        return self.frames.ws

    @property
    def is_open(self) -> bool:
        return self.ws.state is websockets.protocol.State.OPEN

    def session_cost(self) -> int:
        """What the tokens accepted so far cost, in base units."""
        return cost(
            self.input_tokens, self.received, self.input_price_per_mtok, self.output_price_per_mtok
        )

    async def send(self, frame: Mapping[str, Any]) -> None:
        await self.ws.send(json.dumps(dict(frame)))

    async def _next(self) -> Any:
        """Read one frame and do its bookkeeping: count tokens, sign receipts, raise errors."""
        frame = await self.frames.next()
        if isinstance(frame, TokenFrame):
            self._receive_tokens(frame.index, [frame.token_id], [frame.text])
        elif isinstance(frame, TokensFrame):
            self._receive_tokens(frame.index, frame.token_ids, frame.texts)
        elif isinstance(frame, ReplyStart):
            self._accept_input(frame)
        elif isinstance(frame, ReceiptRequest):
            await self._answer(frame)
        elif isinstance(frame, ReceiptAck):
            self.receipted = max(self.receipted, (frame.input_tokens, frame.output_tokens))
        elif isinstance(frame, Settled):
            self.settled = frame
        elif isinstance(frame, SettlementPending):
            self.pending.append(frame)
        elif isinstance(frame, ErrorFrame):
            raise SessionError(frame.code, frame.message)
        return frame

    def _receive_tokens(self, index: int, token_ids: Sequence[int], texts: Sequence[str]) -> None:
        """Tokens ``index``, ``index + 1``, ...: the next ones, in order, or a protocol error."""
        if index != self.received + 1:
            raise SessionError("PROTOCOL", f"token index {index} out of order")
        if self.reply_end is not None and self.received + len(token_ids) > self.reply_end:
            # Never counted, so never signed: the node is not paid for what was not asked.
            raise _refuse(
                f"node sent token {self.received + len(token_ids)} of a reply that may end "
                f"at {self.reply_end} (max_tokens)"
            )
        for offset, (token_id, text) in enumerate(zip(token_ids, texts, strict=True)):
            self.transcript.update(token_id)
            self.tokens.append(StreamedToken(index + offset, token_id, text))
        self.received += len(token_ids)

    def _accept_input(self, frame: ReplyStart) -> None:
        """A prompt's input tokens: no more than the prompt could hold, added once."""
        if frame.prompt_tokens > self.prompt_bound:
            raise _refuse(
                f"node bills {frame.prompt_tokens} tokens for a prompt of at most "
                f"{self.prompt_bound}"
            )
        if frame.input_tokens != self.input_tokens + frame.prompt_tokens:
            raise _refuse(
                f"node's input count {frame.input_tokens} is not ours ({self.input_tokens}) plus "
                f"this prompt's {frame.prompt_tokens}"
            )
        self.input_tokens = frame.input_tokens
        self.prompt_bound = 0

    async def stream(
        self,
        messages: Sequence[dict[str, str]],
        *,
        request_id: str = "r1",
        **params: Any,
    ) -> AsyncIterator[StreamedToken]:
        """Send a prompt and yield its tokens; receipts are signed along the way."""
        self.prompt_bound = prompt_token_bound(messages)
        limit = params.get("max_tokens")
        self.reply_end = self.received + limit if isinstance(limit, int) and limit > 0 else None
        await self.send(
            {"type": "prompt", "request_id": request_id, "messages": list(messages), **params}
        )
        while True:
            frame = await self._next()
            if isinstance(frame, TokenFrame):
                yield self.tokens[-1]
            elif isinstance(frame, TokensFrame):
                for token in self.tokens[-len(frame.token_ids) :]:
                    yield token
            elif isinstance(frame, Done):
                self.last_done = frame
                return

    async def chat(self, messages: Sequence[dict[str, str]], **params: Any) -> Reply:
        """Send a prompt and wait for the whole reply."""
        reply = Reply()
        async for token in self.stream(messages, **params):
            reply.text += token.text
            reply.token_ids.append(token.token_id)
        assert self.last_done is not None
        reply.finish_reason = self.last_done.finish_reason
        reply.prompt_tokens = self.last_done.prompt_tokens
        reply.session_tokens = self.received
        reply.input_tokens = self.input_tokens
        reply.cost = self.session_cost()
        return reply

    async def _answer(self, request: ReceiptRequest) -> None:
        """Sign a receipt only for what we received and accepted, with our transcript."""
        if request.session_id != self.session_id:
            raise _refuse(f"node asks a receipt for session {request.session_id}")
        if request.output_tokens != self.received:
            raise _refuse(
                f"node asks a receipt for {request.output_tokens} tokens; we got {self.received}"
            )
        if request.input_tokens != self.input_tokens:
            raise _refuse(
                f"node asks a receipt for {request.input_tokens} input tokens; we accepted "
                f"{self.input_tokens}"
            )
        if request.transcript_hash != _hex(self.transcript.value):
            raise _refuse("node's transcript hash differs from ours")
        proof_hash = bytes.fromhex(request.proof_hash[2:])
        receipt = Receipt(self.session_id, request.input_tokens, request.output_tokens, proof_hash)
        signature = sign_receipt(self.signer.key, self.domain, receipt)
        signed = SignedReceipt(
            request.input_tokens,
            request.output_tokens,
            proof_hash,
            self.transcript.value,
            request.proof_uri,
            signature,
        )
        if self.on_receipt is not None:
            self.on_receipt(signed)  # persisted before the node can use it
        self.receipts.append(signed)
        await self.send(
            {
                "type": "receipt",
                "input_tokens": request.input_tokens,
                "output_tokens": request.output_tokens,
                "proof_hash": request.proof_hash,
                "signature": _hex(signature),
            }
        )

    async def end(self) -> SessionEnd:
        """Tell the node we are done; returns its ``session_end`` frame.

        The connection stays open for the ``settled`` frame: see ``wait_settlement``.
        """
        if self.ended is None:
            with contextlib.suppress(websockets.ConnectionClosed):
                await self.send({"type": "end"})  # a node already closing has said goodbye
        return await self.wait_session_end()

    async def wait_session_end(self) -> SessionEnd:
        """Read (signing what is asked) until the node's ``session_end``."""
        while self.ended is None:
            frame = await self._next()
            if isinstance(frame, SessionEnd):
                self.ended = frame
        return self.ended

    async def wait_settlement(
        self, timeout: float, on_pending: PendingHook | None = None
    ) -> Settled | SettlementPending | None:
        """After ``end``: the node's final word on the settlement.

        ``settlement_pending`` is progress, not the answer: each one is kept in ``pending``
        and passed to ``on_pending``, and reading goes on until ``settled``, the node's
        give-up (``node_gave_up``), the connection closing, or ``timeout`` seconds. Returns the
        ``settled`` frame, else the last ``settlement_pending`` seen, else None.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        heard = 0
        while True:
            if on_pending is not None:
                for frame in self.pending[heard:]:
                    on_pending(frame)
            heard = len(self.pending)
            final = self.settled if self.settled is not None else self.last_pending
            left = deadline - loop.time()
            if self.settled is not None or self.node_gave_up or left <= 0:
                return final
            try:
                await asyncio.wait_for(self._next(), left)
            except (TimeoutError, websockets.ConnectionClosed):
                return final

    @property
    def last_pending(self) -> SettlementPending | None:
        return self.pending[-1] if self.pending else None

    @property
    def node_gave_up(self) -> bool:
        """The node's last ``settlement_pending`` says it stopped trying to settle."""
        last = self.last_pending
        return last is not None and last.reason.startswith(SETTLEMENT_GAVE_UP)

    async def close(self) -> None:
        await self.ws.close()


class _Frames:
    """The node's frames one at a time, in order: a message holds one, or several (a JSON
    array of the frames the node had ready at once)."""

    def __init__(self, ws: SealedSocket) -> None:
        self.ws = ws
        self._ready: deque[Any] = deque()

    async def next(self) -> Any:
        if not self._ready:
            self._ready.extend(await _recv(self.ws, parse_node_frames))
        return self._ready.popleft()


async def _recv(ws: SealedSocket, parse: Callable[[str | bytes], Any]) -> Any:
    try:
        return parse(await ws.recv())
    except NodeFrameError as exc:
        raise SessionError("PROTOCOL", str(exc)) from exc
    except SealBroken as exc:
        raise SessionError(
            "BAD_SEAL", f"the node's {exc}; the session is intact: reconnect to resume it"
        ) from exc


def _expect(frame: Any, kind: type[Any], name: str) -> Any:
    if isinstance(frame, ErrorFrame):
        raise SessionError(frame.code, frame.message)
    if not isinstance(frame, kind):
        raise SessionError("PROTOCOL", f"expected {name}, node sent {frame.type}")
    return frame
