"""The OpenAI chat-completions format: the requests the gateway takes and the bodies and
stream chunks it answers with.

Only what a node can honour is accepted; any other field that asks for something
(``n`` > 1, ``tools``, ``logprobs``...) is refused with a 400 naming it, rather than
silently ignored, so a client never pays for an answer it did not ask for.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from inferledger.gateway.errors import bad_request

# Fields OpenAI defines that the gateway accepts when they ask for nothing beyond the
# default (the value each must have); any other value is refused.
HARMLESS_DEFAULTS: dict[str, tuple[object, ...]] = {
    "n": (None, 1),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logprobs": (None, False),
    "store": (None, False),
    "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}),
    "metadata": (None, {}),
}
FINISH_REASONS = {"stop": "stop", "length": "length", "budget": "length", "closing": "length"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """``POST /v1/chat/completions``: the fields a node can serve."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stop

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def reply_limit(self) -> int | None:
        """The most completion tokens asked for (``max_completion_tokens`` wins)."""
        return self.max_completion_tokens or self.max_tokens

    def chat_messages(self) -> list[dict[str, str]]:
        """The messages as the node takes them: role and plain-text content."""
        return [_plain(index, message) for index, message in enumerate(self.messages)]

    def params(self) -> dict[str, Any]:
        """Generation parameters for ``Session.chat``/``stream``, only those given."""
        params: dict[str, Any] = {}
        if self.reply_limit is not None:
            params["max_tokens"] = self.reply_limit
        for name in ("temperature", "top_p", "seed"):
            if getattr(self, name) is not None:
                params[name] = getattr(self, name)
        if self.stop is not None:
            params["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return params


def parse_request(body: object) -> ChatRequest:
    """A request, or a 400 naming the first field that is wrong or unsupported."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    if "stream_options" in body and body["stream_options"] is not None and not body.get("stream"):
        raise bad_request("stream_options is only allowed with stream: true", "stream_options")
    try:
        request = ChatRequest.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(p) for p in error["loc"])
        raise bad_request(f"{param}: {error['msg']}", param) from None
    for name, value in (request.model_extra or {}).items():
        if value not in HARMLESS_DEFAULTS.get(name, (None,)):
            what = "n > 1" if name == "n" else name
            raise bad_request(
                f"{what} is not supported by inferledger hosts; remove {name!r}",
                name,
                code="unsupported_parameter",
            )
    request.chat_messages()  # refuse unusable messages before anything is paid
    return request


def _plain(index: int, message: dict[str, Any]) -> dict[str, str]:
    role, content = message.get("role"), message.get("content")
    if role == "developer":
        role = "system"
    if role not in ("system", "user", "assistant"):
        raise bad_request(
            f"messages[{index}].role {role!r} is not supported: use system, user or assistant",
            f"messages[{index}].role",
        )
    if isinstance(content, list):
        if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
            raise bad_request(
                f"messages[{index}].content: only text parts are supported",
                f"messages[{index}].content",
            )
        content = "".join(str(p.get("text", "")) for p in content)
    if not isinstance(content, str):
        raise bad_request(
            f"messages[{index}].content must be a string", f"messages[{index}].content"
        )
    unsupported = sorted(set(message) - {"role", "content", "name"})
    if unsupported:
        raise bad_request(
            f"messages[{index}].{unsupported[0]} is not supported",
            f"messages[{index}].{unsupported[0]}",
        )
    return {"role": role, "content": content}


def completion_id(session_id: int, request_seq: int) -> str:
    return f"chatcmpl-il-{session_id}-{request_seq}"


def completion(
    ident: str, model: str, text: str, finish_reason: str, usage: dict[str, Any]
) -> dict[str, Any]:
    """A whole ``chat.completion`` body."""
    return {
        "id": ident,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": FINISH_REASONS.get(finish_reason, "stop"),
                "logprobs": None,
            }
        ],
        "usage": usage,
    }


def chunk(
    ident: str,
    model: str,
    delta: dict[str, str] | None,
    finish_reason: str | None = None,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One ``chat.completion.chunk``; ``delta`` None gives the usage-only final chunk."""
    choices: list[dict[str, Any]] = []
    if delta is not None:
        reason = FINISH_REASONS.get(finish_reason, "stop") if finish_reason else None
        choices.append({"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None})
    body: dict[str, Any] = {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage
    return body
