"""Every failure the gateway reports, in OpenAI's error shape, from one place.

OpenAI clients read ``{"error": {"message", "type", "code", "param"}}`` and the HTTP
status (the ``openai`` package turns 400/401/402/404/503 into its exception classes), so
each refusal is a :class:`GatewayError` carrying both, and :func:`from_sdk` decides once
how the SDK's and the chain's errors look to such a client.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse

from inferledger.chain.errors import ChainError
from inferledger.sdk.errors import ConnectionLost, NodeUnreachable, SdkError, SessionClosed
from inferledger.sdk.wire import SessionError

RETRY_AFTER = 5  # seconds a client is told to wait on 503
SESSION_ENDED = ("SESSION_CLOSING", "SESSION_CLOSED")  # the session, not the host, is done


class GatewayError(Exception):
    """A request the gateway refuses or cannot serve, as OpenAI would say it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str,
        code: str | None = None,
        param: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.extra = extra or {}
        self.spent = 0  # base units signed for before the request failed (failed attempts)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "code": self.code,
                "param": self.param,
                **self.extra,
            }
        }

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER)} if self.status == 503 else {}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers())

    def sse_event(self) -> bytes:
        """The error as the last event of a stream that already started (the ``openai``
        package raises ``APIError`` on a data line holding ``error``)."""
        return f"data: {json.dumps(self.body())}\n\n".encode()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, type="invalid_request_error", param=param, code=code)


def unauthorized(message: str) -> GatewayError:
    return GatewayError(401, message, type="invalid_request_error", code="invalid_api_key")


def budget_exceeded(budget: str, left: str, message: str) -> GatewayError:
    """402: a spend limit (or the account's balance) cannot pay for the request."""
    return GatewayError(
        402,
        message,
        type="insufficient_quota",
        code="budget_exceeded",
        extra={"budget": budget, "left": left},
    )


def model_not_found(model: str) -> GatewayError:
    return GatewayError(
        404,
        f"model {model!r} is not approved in the ModelRegistry: GET /v1/models lists the "
        "models with an active host",
        type="invalid_request_error",
        code="model_not_found",
        param="model",
    )


def unavailable(message: str, code: str = "no_host_available") -> GatewayError:
    """503 with Retry-After: no host can serve now, or the chain cannot be read."""
    return GatewayError(503, message, type="service_unavailable", code=code)


def upstream_failed(message: str) -> GatewayError:
    """A host failed after the reply started: only the stream's last event can say so."""
    return GatewayError(502, message, type="upstream_error", code="host_failed")


def internal_error() -> GatewayError:
    """A bug in the gateway: the message is generic, the log has the details."""
    return GatewayError(500, "the gateway failed unexpectedly; see its log", type="server_error")


def host_fault(exc: BaseException) -> bool:
    """Whether the host is to blame (and so avoided for a while), not the session or us."""
    if isinstance(exc, SessionError):
        return exc.code not in ("BUDGET_EXHAUSTED", "BAD_REQUEST", *SESSION_ENDED)
    return isinstance(exc, NodeUnreachable | ConnectionLost | OSError | TimeoutError)


def session_spent(exc: BaseException) -> bool:
    """The session cannot take this prompt but a fresh one on the same host may."""
    if isinstance(exc, SessionError):
        return exc.code in ("BUDGET_EXHAUSTED", *SESSION_ENDED)
    return isinstance(exc, SessionClosed)


def from_sdk(exc: BaseException) -> GatewayError:
    """How an SDK or chain failure looks to an OpenAI client."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, SessionError) and exc.code == "BAD_REQUEST":
        return bad_request(f"the host refused the generation parameters: {exc.message}")
    if isinstance(exc, ChainError):
        return unavailable(f"the chain is unavailable: {exc}", code="chain_unavailable")
    if isinstance(exc, SdkError | OSError | TimeoutError):
        return unavailable(f"no host could serve the request: {exc}")
    raise exc
