"""A hand-written host node that logs in honestly and then cheats, for the gateway tests.

``lie``: streams three tokens, then asks a receipt for eight. ``die``: streams four
tokens, takes a receipt for them, streams three more and drops the connection. Either
way it serves one connection; later logins (the gateway coming back to close the
session) are dropped at once, as a host that vanished would.
"""

from __future__ import annotations

import asyncio
import json
import threading
from http import HTTPStatus
from typing import Any, Literal

from eth_account.signers.local import LocalAccount
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from inferledger.chain.receipts import ReceiptDomain
from inferledger.proofs.transcript import TranscriptHash
from inferledger.protocol.server import (
    ReceiptAck,
    ReceiptRequest,
    ReplyStart,
    SessionReady,
    TokenFrame,
)
from sealed_host import HostEnd

Behaviour = Literal["lie", "die"]
ZERO = "0x" + "00" * 32
PROMPT_TOKENS = 10
FIRST_TOKEN = 300


class HostileNode:
    def __init__(
        self,
        domain: ReceiptDomain,
        host: LocalAccount,
        prices: tuple[int, int],
        behaviour: Behaviour,
    ) -> None:
        self.domain = domain
        self.host = host  # the registered host's own key: its challenge is genuine
        self.prices = prices
        self.behaviour = behaviour
        self.logins = 0
        self.receipts: list[dict[str, Any]] = []
        self._loop = asyncio.new_event_loop()
        self._server: Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> HostileNode:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    async def _listen(self) -> Server:
        return await serve(self._serve, "127.0.0.1", 0, process_request=self._health)

    @property
    def url(self) -> str:
        assert self._server is not None
        port = next(iter(self._server.sockets)).getsockname()[1]
        return f"ws://127.0.0.1:{port}/v1/ws"

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            asyncio.run_coroutine_threadsafe(self._server.wait_closed(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _health(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/health":
            body = json.dumps({"status": "ok", "accepting_sessions": True})
            return connection.respond(HTTPStatus.OK, body)
        return None

    async def _serve(self, socket: ServerConnection) -> None:
        self.logins += 1
        if self.logins > 1:
            return  # gone: the connection closes before the challenge
        ws = HostEnd(socket, self.host, self.domain)
        await ws.start()
        session_id = json.loads(await ws.recv())["session_id"]
        transcript = TranscriptHash(session_id)
        await ws.send(
            SessionReady(
                session_id=session_id,
                model="m",
                deposit=10**6,
                input_price_per_mtok=self.prices[0],
                output_price_per_mtok=self.prices[1],
                proof_interval=100,
                max_unreceipted_tokens=32,
                receipted_input_tokens=0,
                receipted_output_tokens=0,
                served_input_tokens=0,
                served_output_tokens=0,
                transcript_hash="0x" + transcript.value.hex(),
                expires_at=2**40,
                settles_at=2**40,
            ).model_dump_json()
        )
        request_id = json.loads(await ws.recv())["request_id"]
        await ws.send(
            ReplyStart(
                request_id=request_id, prompt_tokens=PROMPT_TOKENS, input_tokens=PROMPT_TOKENS
            ).model_dump_json()
        )
        sent = 0

        async def tokens(count: int) -> None:
            nonlocal sent
            for _ in range(count):
                sent += 1
                transcript.update(FIRST_TOKEN + sent)
                frame = TokenFrame(
                    request_id=request_id, index=sent, token_id=FIRST_TOKEN + sent, text=" word"
                )
                await ws.send(frame.model_dump_json())

        def receipt_request(output_tokens: int) -> str:
            return ReceiptRequest(
                session_id=session_id,
                input_tokens=PROMPT_TOKENS,
                output_tokens=output_tokens,
                proof_hash=ZERO,
                transcript_hash="0x" + transcript.value.hex(),
                proof_uri=None,
            ).model_dump_json()

        if self.behaviour == "lie":
            await tokens(3)
            await ws.send(receipt_request(sent + 5))  # five tokens it never sent
            await socket.wait_closed()
            return
        await tokens(4)
        await ws.send(receipt_request(sent))
        self.receipts.append(json.loads(await ws.recv()))
        await ws.send(ReceiptAck(input_tokens=PROMPT_TOKENS, output_tokens=sent).model_dump_json())
        await tokens(3)
        await socket.close()  # dies mid-reply, three tokens unreceipted
