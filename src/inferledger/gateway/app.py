"""The HTTP side: OpenAI's routes over a :class:`Gateway`, and the server that runs them.

``POST /v1/chat/completions``, ``GET /v1/models``, and the gateway's own
``GET /v1/inferledger/sessions`` and ``GET /metrics`` (Prometheus). Every response
carries ``x-inferledger-session`` (the session that served it, "none" when none did) and
``x-inferledger-cost`` (USDC: what the request cost; a stream must send its headers
before the reply, so there it is what the session had cost before the request, and the
request's own cost is in the final usage chunk).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from inferledger.chain.errors import ChainError
from inferledger.chain.units import format_usdc
from inferledger.config import ConfigError, Settings
from inferledger.gateway.errors import (
    GatewayError,
    bad_request,
    from_sdk,
    internal_error,
    unauthorized,
)
from inferledger.gateway.schema import parse_request
from inferledger.gateway.service import Gateway
from inferledger.sdk.errors import SdkError

log = logging.getLogger("inferledger.gateway")
SESSION_HEADER = "x-inferledger-session"
COST_HEADER = "x-inferledger-cost"
NOTHING = {SESSION_HEADER: "none", COST_HEADER: "0.000000"}


def check_exposure(settings: Settings) -> None:
    """Refuse to serve beyond loopback without an API key: anyone reaching the port
    would spend the user's USDC."""
    if settings.gateway_api_key is None and not _loopback(settings.gateway_bind):
        raise ConfigError(
            f"setting gateway_api_key (INFERLEDGER_GATEWAY_API_KEY) is required when "
            f"gateway_bind is {settings.gateway_bind}, beyond loopback: set a key, or bind "
            "127.0.0.1"
        )


def _loopback(bind: str) -> bool:
    if bind == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return False


class LeasedStream(StreamingResponse):
    """An SSE response that ends its request's lease however the response ends, even
    when the client left before the first byte (the stream never ran)."""

    def __init__(
        self,
        events: AsyncGenerator[bytes, None],
        end: Callable[[], Awaitable[None]],
        **options: Any,
    ) -> None:
        super().__init__(events, media_type="text/event-stream", **options)
        self._events = events
        self._end = end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()  # a no-op once drained; ends a stream never started
            await self._end()


def create_app(gateway: Gateway) -> Starlette:
    key = gateway.settings.gateway_api_key

    def authorize(request: Request) -> None:
        if key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not token:
            raise unauthorized("missing API key: send Authorization: Bearer <gateway_api_key>")
        if not hmac.compare_digest(token.encode(), key.get_secret_value().encode()):
            raise unauthorized("wrong API key: send the gateway's gateway_api_key")

    async def chat_completions(request: Request) -> Response:
        authorize(request)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise bad_request("the request body is not JSON") from None
        chat = parse_request(body)
        if not chat.stream:
            completion, lease = await gateway.complete(chat)
            headers = {
                SESSION_HEADER: str(lease.session.id),
                COST_HEADER: completion["usage"]["cost"],
            }
            return JSONResponse(completion, headers=headers)
        events, lease = await gateway.stream(chat)
        headers = {
            SESSION_HEADER: str(lease.session.id),
            COST_HEADER: format_usdc(lease.paid_before),
            "cache-control": "no-cache",
        }
        return LeasedStream(events, lambda: gateway.end(lease, abandoned=True), headers=headers)

    async def models(request: Request) -> Response:
        authorize(request)
        return JSONResponse({"object": "list", "data": await gateway.models()}, headers=NOTHING)

    async def sessions(request: Request) -> Response:
        authorize(request)
        return JSONResponse(gateway.view(), headers=NOTHING)

    async def metrics(request: Request) -> Response:
        authorize(request)
        return Response(
            generate_latest(gateway.registry), media_type=CONTENT_TYPE_LATEST, headers=NOTHING
        )

    async def refused(request: Request, exc: Exception) -> Response:
        if isinstance(exc, GatewayError | SdkError | ChainError):
            error = from_sdk(exc)
        else:
            log.exception("unexpected error serving %s", request.url.path, exc_info=exc)
            error = internal_error()
        response = error.response()
        response.headers.update({**NOTHING, COST_HEADER: format_usdc(error.spent)})
        return response

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/inferledger/sessions", sessions, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={Exception: refused, GatewayError: refused},
        lifespan=lifespan,
    )


def uvicorn_config(gateway: Gateway, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(gateway), host=host, port=port, log_level="warning", lifespan="on"
    )


class GatewayServer:
    """The gateway served from a thread: for embedding in a program, and for tests.

    ``stop()`` shuts it down as SIGTERM would: every session is closed first.
    """

    def __init__(self, gateway: Gateway, host: str = "127.0.0.1", port: int = 0) -> None:
        self.gateway = gateway
        self.host = host
        self.server = uvicorn.Server(uvicorn_config(gateway, host, port))
        self.thread = threading.Thread(target=self._run, name="inferledger-gateway", daemon=True)

    def _run(self) -> None:
        asyncio.run(self.server.serve())

    def start(self, timeout: float = 30.0) -> GatewayServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and self.thread.is_alive():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start within {timeout:.0f}s")
            time.sleep(0.02)
        if not self.server.started:
            raise RuntimeError("the gateway stopped while starting (see its log)")
        return self

    @property
    def url(self) -> str:
        """The OpenAI base URL: ``http://host:port/v1``."""
        (sock,) = [s for server in self.server.servers for s in server.sockets][:1]
        return f"http://{self.host}:{sock.getsockname()[1]}/v1"

    def stop(self, timeout: float = 120.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=timeout)

    def __enter__(self) -> GatewayServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
