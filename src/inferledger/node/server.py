"""The node's ASGI app (Starlette) and a uvicorn runner.

HTTP: ``/health`` (preflight), ``/metrics`` (Prometheus), ``/v1/models``,
``/v1/sessions/{id}``. WebSocket: ``/v1/ws``, the session protocol.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from inferledger.node.connection import Connection
from inferledger.node.node import Node

# uvicorn closes the socket above this size; frames between max_frame_bytes and this
# get a FRAME_TOO_LARGE error frame and the connection stays usable.
HARD_FRAME_LIMIT = 16 * 1024 * 1024


def create_app(node: Node) -> Starlette:
    async def websocket_endpoint(websocket: WebSocket) -> None:
        await Connection(node, websocket).run()

    async def health(request: Request) -> JSONResponse:
        report = node.preflight
        body = {
            "status": "ok" if report.ok else "degraded",
            "accepting_sessions": node.ready,
            "host": node.address,
            "model": node.model_name,
            "checks": report.as_dict(),
        }
        return JSONResponse(body, status_code=200 if report.ok else 503)

    async def metrics(request: Request) -> Response:
        return Response(node.metrics.render(), media_type="text/plain; version=0.0.4")

    async def models(request: Request) -> JSONResponse:
        price = await asyncio.to_thread(node.contracts.nodes.price_of, node.address, node.model_id)
        return JSONResponse(
            {
                "models": [
                    {
                        "name": node.model_name,
                        "model_id": "0x" + node.model_id.hex(),
                        "price_per_mtok": price,
                        "backend": node.settings.backend,
                    }
                ]
            }
        )

    async def session(request: Request) -> JSONResponse:
        session_id = request.path_params["session_id"]
        record = await asyncio.to_thread(node.state.get_session, session_id)
        if record is None:
            return JSONResponse(
                {"error": "SESSION_NOT_FOUND", "message": f"no session {session_id} on this node"},
                status_code=404,
            )
        receipts = await asyncio.to_thread(node.state.receipts, session_id)
        return JSONResponse(
            {
                "session_id": record.session_id,
                "depositor": record.depositor,
                "status": record.status,
                "live": session_id in node.live_sessions,
                "tokens_generated": record.tokens_generated,
                "tokens_receipted": record.tokens_receipted,
                "proof_interval": record.proof_interval,
                "price_per_mtok": str(record.price_per_mtok),
                "deposit": str(record.deposit),
                "receipts": [
                    {"tokens": r.tokens, "proof_hash": "0x" + r.proof_hash.hex()} for r in receipts
                ],
            }
        )

    return Starlette(
        routes=[
            WebSocketRoute("/v1/ws", websocket_endpoint),
            Route("/health", health),
            Route("/metrics", metrics),
            Route("/v1/models", models),
            Route("/v1/sessions/{session_id:int}", session),
        ]
    )


def uvicorn_config(node: Node, host: str, port: int, **options: Any) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(node),
        host=host,
        port=port,
        ws_max_size=HARD_FRAME_LIMIT,
        log_level=options.pop("log_level", "warning"),
        lifespan="off",
        **options,
    )


class BackgroundServer:
    """Runs a node's server in a thread (tests, the demo); ``url`` once started."""

    def __init__(self, node: Node, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = uvicorn.Server(uvicorn_config(node, host, port))
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
        return sock.getsockname()[1]

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
