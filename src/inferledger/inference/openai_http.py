"""Backend that relays to an upstream OpenAI-compatible server (``/v1/chat/completions``).

Token ids: the OpenAI API does not return them. We ask for ``logprobs`` and then, per entry:

* use ``entry["id"]`` when present (llama.cpp's server sends it);
* parse ``"token_id:<n>"`` tokens (vLLM with ``return_tokens_as_token_ids``; pass it through
  ``extra_body``);
* otherwise emit ``UNKNOWN_TOKEN_ID`` (-1), one :class:`Token` per logprobs entry.

When a chunk carries no logprobs at all we count the chunk as one token, with id -1. Servers
usually send one token per chunk, but nothing guarantees it, so counts from such a server are
an estimate. There is no tokenizer here and no hidden states: this backend cannot back
activation proofs.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from inferledger.inference.base import (
    UNKNOWN_TOKEN_ID,
    Event,
    Finish,
    FinishReason,
    GenerationParams,
    Message,
    Token,
    UnsupportedFeature,
    UpstreamError,
    validate_messages,
)


class OpenAIHTTPBackend:
    """Streams chat completions from ``base_url`` (with or without a trailing ``/v1``)."""

    supports_hidden_states = False
    engine = "openai_http"
    dtype = "unknown"
    sampler = "remote"  # the server samples; nobody can recompute its choices
    weights_path: Path | None = None

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        request_logprobs: bool = True,
        extra_body: Mapping[str, Any] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        root = base_url.rstrip("/")
        self.url = (
            f"{root}/chat/completions" if root.endswith("/v1") else f"{root}/v1/chat/completions"
        )
        self.model = model
        self.name = f"openai_http/{model}"
        self.request_logprobs = request_logprobs
        self.extra_body = dict(extra_body or {})
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            headers=headers, timeout=httpx.Timeout(timeout, connect=10.0), transport=transport
        )

    def tokenize_chat(self, messages: Sequence[Message]) -> list[int]:
        raise UnsupportedFeature("openai_http has no tokenizer; the upstream server tokenizes")

    def prefill_hidden_states(self, token_ids: Sequence[int]) -> np.ndarray:
        raise UnsupportedFeature("openai_http cannot return hidden states")

    def generate(
        self,
        messages: Sequence[Message],
        params: GenerationParams,
        *,
        capture_hidden_states: bool = False,
    ) -> Generator[Event, None, None]:
        if capture_hidden_states:
            raise UnsupportedFeature("openai_http cannot return hidden states")
        return self._generate(self._request_body(validate_messages(messages), params), params)

    def close(self) -> None:
        self._client.close()

    def _request_body(self, messages: list[Message], params: GenerationParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if self.request_logprobs:
            body["logprobs"] = True
        body.update(self.extra_body)
        return body

    def _generate(
        self, body: dict[str, Any], params: GenerationParams
    ) -> Generator[Event, None, None]:
        produced = 0
        reason: FinishReason | None = None
        prompt_tokens: int | None = None
        with closing(self._stream_chunks(body)) as chunks:
            for chunk in chunks:
                usage = chunk.get("usage") or {}
                if isinstance(usage.get("prompt_tokens"), int):
                    prompt_tokens = usage["prompt_tokens"]
                choices = chunk.get("choices") or []
                if not choices:
                    continue
                choice = choices[0]  # we never ask for n > 1
                tokens = tokens_from_choice(choice)
                room = params.max_tokens - produced
                yield from tokens[:room]
                produced += min(len(tokens), room)
                if len(tokens) > room:
                    # The upstream ignored max_tokens; enforce the budget here and hang up.
                    reason = "length"
                    break
                finished = choice.get("finish_reason")
                if finished:
                    reason = "length" if finished == "length" else "stop"
        if reason is None:
            raise UpstreamError("upstream stream ended without a finish_reason")
        yield Finish(reason=reason, prompt_tokens=prompt_tokens)

    def _stream_chunks(self, body: dict[str, Any]) -> Generator[dict[str, Any], None, None]:
        """Parsed JSON chunks of one streamed request, until ``[DONE]``."""
        try:
            with self._client.stream("POST", self.url, json=body) as response:
                if response.status_code != 200:
                    detail = response.read().decode(errors="replace")[:300]
                    raise UpstreamError(f"upstream answered {response.status_code}: {detail}")
                for payload in iter_sse_data(response.iter_lines()):
                    if payload.strip() == "[DONE]":
                        return
                    yield _parse_chunk(payload)
        except httpx.HTTPError as error:
            raise UpstreamError(f"upstream request failed: {error!r}") from error


def iter_sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The ``data`` payload of each server-sent event (multi-line data joined by newlines)."""
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue  # comment / keep-alive
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value.removeprefix(" "))
    if data:
        yield "\n".join(data)


def tokens_from_choice(choice: Mapping[str, Any]) -> list[Token]:
    """Tokens in one streamed choice delta (see the module docstring for the id rules)."""
    text = (choice.get("delta") or {}).get("content") or ""
    entries = ((choice.get("logprobs") or {}).get("content")) or []
    if not entries:
        return [Token(token_id=UNKNOWN_TOKEN_ID, text=text)] if text else []
    pieces = [entry.get("token") or "" for entry in entries]
    if "".join(pieces) != text:
        # Token strings don't spell the delta (e.g. "token_id:42"): the delta is authoritative.
        pieces = [text] + [""] * (len(entries) - 1)
    return [
        Token(token_id=_token_id(entry), text=piece)
        for entry, piece in zip(entries, pieces, strict=True)
    ]


def _token_id(entry: Mapping[str, Any]) -> int:
    token_id = entry.get("id")
    if isinstance(token_id, int):
        return token_id
    token = entry.get("token")
    if isinstance(token, str) and token.startswith("token_id:"):
        try:
            return int(token.removeprefix("token_id:"))
        except ValueError:
            pass
    return UNKNOWN_TOKEN_ID


def _parse_chunk(payload: str) -> dict[str, Any]:
    try:
        chunk = json.loads(payload)
    except json.JSONDecodeError:
        raise UpstreamError(f"upstream sent invalid JSON: {payload[:200]!r}") from None
    if not isinstance(chunk, dict):
        raise UpstreamError(f"upstream sent an unexpected event: {payload[:200]!r}")
    if "error" in chunk:
        raise UpstreamError(f"upstream error: {json.dumps(chunk['error'])[:300]}")
    return chunk
