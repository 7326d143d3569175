"""The node's ASGI app (Starlette) and a uvicorn runner.

HTTP: ``/health`` (preflight and the chain), ``/metrics`` (Prometheus), ``/v1/models``,
``/v1/sessions/{id}`` (checkpoints and settlement), ``/v1/proofs/{hash}`` (stored bundles).
WebSocket: ``/v1/ws``, the session protocol. The settlement worker runs for as long as the
app does (started and stopped by its lifespan).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from inferledger.chain.receipts import (
    READ_SIGNATURE_HEADER,
    READ_TIMESTAMP_HEADER,
    recover_session_read_signer,
)
from inferledger.node.connection import Connection, Gate
from inferledger.node.node import Node
from inferledger.node.threads import named_pool
from inferledger.protocol.client import INT64_MAX
from inferledger.store.blobs import BlobNotFound, CorruptBlob

_TO_THREAD_WORKERS = min(32, (os.cpu_count() or 1) + 4)  # asyncio's own default size
_PROOF_HASH = re.compile(r"0x[0-9a-f]{64}")
_ID = re.compile(r"[1-9][0-9]{0,18}")  # 1 .. 10**19 - 1: never more digits than int64 has


class BadPathParameter(Exception):
    """A path parameter outside its bounds: a 400 with the reason, never a 500."""


def _path_id(request: Request, name: str) -> int:
    """Path parameter ``name`` as an id the node's SQLite can hold (1 .. 2**63 - 1)."""
    text = request.path_params[name]
    if not _ID.fullmatch(text) or int(text) > INT64_MAX:
        raise BadPathParameter(f"{name} must be an integer from 1 to {INT64_MAX}")
    return int(text)


async def _bad_path_parameter(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": "BAD_REQUEST", "message": str(exc)}, status_code=400)


# Frames up to this much above max_frame_bytes are read, to answer FRAME_TOO_LARGE and keep
# the connection usable; anything larger is not read at all.
FRAME_SLACK = 64 * 1024


def ws_max_size(max_frame_bytes: int) -> int:
    """The largest frame the WebSocket layer reads: above it the socket is closed (1009)
    after the frame's header, before its payload is buffered."""
    return max_frame_bytes + FRAME_SLACK


_SIGNATURE = re.compile(r"0x[0-9a-fA-F]{130}")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
READ_MAX_SKEW = 60
"""Seconds a signed ``/v1/sessions/{id}`` request stays valid either side of the node's clock."""


def create_app(node: Node) -> Starlette:
    gate = Gate.from_settings(node.settings)

    async def websocket_endpoint(websocket: WebSocket) -> None:
        await Connection(node, websocket, gate).run()

    async def health(request: Request) -> JSONResponse:
        """200 while the node takes paid sessions (``degraded`` when something is wrong that
        does not stop it, e.g. unproven checkpoints or transactions not being mined); 503
        when it cannot take them. ``problems`` says what is wrong, one line each."""
        report = node.preflight
        assert node.health is not None
        problems = [r.line() for r in report.failures] + node.health.problems()
        accepting = node.ready and not node.health.unreachable
        body = {
            "status": "degraded" if problems else "ok",
            "accepting_sessions": accepting,
            "problems": problems,
            "host": node.address,
            "model": node.model_name,
            "checks": report.as_dict(),
        }
        return JSONResponse(body, status_code=200 if accepting else 503)

    async def metrics(request: Request) -> Response:
        return Response(node.metrics.render(), media_type="text/plain; version=0.0.4")

    async def models(request: Request) -> JSONResponse:
        prices = await asyncio.to_thread(
            node.contracts.nodes.prices_of, node.address, node.model_id
        )
        return JSONResponse(
            {
                "models": [
                    {
                        "name": node.model_name,
                        "model_id": "0x" + node.model_id.hex(),
                        "input_price_per_mtok": prices[0],
                        "output_price_per_mtok": prices[1],
                        "backend": node.settings.backend,
                    }
                ]
            }
        )

    async def session(request: Request) -> JSONResponse:
        """The node's record of a session, for its signer only (a signed request): to anyone
        else it would tell who deposited, whether they are online and what they paid for."""
        session_id = _path_id(request, "session_id")
        signed = _signed_read(request.headers, time.time())
        if isinstance(signed, str):
            return JSONResponse({"error": "UNAUTHORIZED", "message": signed}, status_code=401)
        record = await asyncio.to_thread(node.state.get_session, session_id)
        if record is None or not _signed_by(node, session_id, signed, record.signer):
            return JSONResponse(
                {
                    "error": "SESSION_NOT_FOUND",
                    "message": f"no session {session_id} on this node signed for by this key",
                },
                status_code=404,
            )
        receipts = await asyncio.to_thread(node.state.receipts, session_id)
        checkpoints = await asyncio.to_thread(node.outbox.checkpoints, session_id)
        settlement = await asyncio.to_thread(node.outbox.settlement, session_id)
        transactions = await asyncio.to_thread(node.outbox.transactions, session_id)
        return JSONResponse(
            {
                "session_id": record.session_id,
                "depositor": record.depositor,
                "status": record.status,
                "live": session_id in node.live,
                "input_tokens_served": record.input_served,
                "input_tokens_receipted": record.input_receipted,
                "tokens_generated": record.tokens_generated,
                "tokens_receipted": record.tokens_receipted,
                "proof_interval": record.proof_interval,
                "input_price_per_mtok": str(record.input_price_per_mtok),
                "output_price_per_mtok": str(record.output_price_per_mtok),
                "deposit": str(record.deposit),
                "receipts": [
                    {
                        "input_tokens": r.input_tokens,
                        "tokens": r.tokens,
                        "proof_hash": "0x" + r.proof_hash.hex(),
                    }
                    for r in receipts
                ],
                "checkpoints": [c.as_dict() for c in checkpoints],
                "settlement": settlement.as_dict() if settlement else None,
                "transactions": transactions,
            }
        )

    async def proof(request: Request) -> Response:
        text = request.path_params["proof_hash"].lower()
        if not _PROOF_HASH.fullmatch(text):
            return JSONResponse(
                {"error": "BAD_REQUEST", "message": "a proof hash is 0x and 64 hex digits"},
                status_code=400,
            )
        try:
            data = await asyncio.to_thread(node.store.get, bytes.fromhex(text[2:]))
        except BlobNotFound:
            return JSONResponse(
                {"error": "PROOF_NOT_FOUND", "message": f"no proof bundle {text} on this node"},
                status_code=404,
            )
        except CorruptBlob as exc:
            return JSONResponse({"error": "PROOF_CORRUPT", "message": str(exc)}, status_code=500)
        return Response(data, media_type="application/json")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # The to_thread pool (state reads, checkpoints, chain calls) named for the OS too.
        asyncio.get_running_loop().set_default_executor(named_pool(_TO_THREAD_WORKERS, "to_thread"))
        node.settlement.start()
        try:
            yield
        finally:
            await asyncio.to_thread(node.settlement.stop)

    return Starlette(
        routes=[
            WebSocketRoute("/v1/ws", websocket_endpoint),
            Route("/health", health),
            Route("/metrics", metrics),
            Route("/v1/models", models),
            Route("/v1/sessions/{session_id}", session),
            Route("/v1/proofs/{proof_hash}", proof),
        ],
        lifespan=lifespan,
        exception_handlers={BadPathParameter: _bad_path_parameter},
    )


def _signed_read(headers: Mapping[str, str], now: float) -> tuple[int, bytes] | str:
    """(timestamp, signature) of a fresh signed read, or why the request is not one."""
    stamp, signature = headers.get(READ_TIMESTAMP_HEADER), headers.get(READ_SIGNATURE_HEADER)
    if stamp is None or signature is None:
        return (
            f"sign the request with the session signer: {READ_TIMESTAMP_HEADER} and "
            f"{READ_SIGNATURE_HEADER} (see docs/protocol.md, HTTP)"
        )
    if not _TIMESTAMP.fullmatch(stamp) or not _SIGNATURE.fullmatch(signature):
        return f"{READ_TIMESTAMP_HEADER} is unix seconds, {READ_SIGNATURE_HEADER} 65 bytes of hex"
    if abs(int(stamp) - now) > READ_MAX_SKEW:
        return f"stale request: the timestamp is more than {READ_MAX_SKEW}s from the node's clock"
    return int(stamp), bytes.fromhex(signature[2:])


def _signed_by(node: Node, session_id: int, signed: tuple[int, bytes], signer: str) -> bool:
    timestamp, signature = signed
    try:
        found = recover_session_read_signer(
            node.domain, session_id, timestamp, node.address, signature
        )
    except Exception:  # eth-keys rejects malformed signatures with several exception types
        return False
    return found.lower() == signer.lower()


def uvicorn_config(node: Node, host: str, port: int, **options: Any) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(node),
        host=host,
        port=port,
        ws_max_size=ws_max_size(node.settings.max_frame_bytes),
        log_level=options.pop("log_level", "warning"),
        lifespan="on",
        **options,
    )


class BackgroundServer:
    """Runs a node's server (or another ``app``: a verifier's) in a thread (tests, the
    demo); ``url`` once started."""

    def __init__(
        self,
        node: Node | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        app: Any = None,
    ) -> None:
        if node is not None:
            config = uvicorn_config(node, host, port)
        else:
            config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="inferledger-node", daemon=True)
        self.host = host

    def _run(self) -> None:
        asyncio.run(self.server.serve())

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            raise RuntimeError(f"node server did not start within {timeout:.0f}s")
        return self

    @property
    def port(self) -> int:
        (sock,) = [s for server in self.server.servers for s in server.sockets][:1]
        return int(sock.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/v1/ws"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
