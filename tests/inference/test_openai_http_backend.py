"""OpenAIHTTPBackend against a stub OpenAI-compatible server on 127.0.0.1.

Each test scripts the exact SSE bytes the stub sends and makes one or two requests.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from inference_support import collect

from inferledger.inference import (
    UNKNOWN_TOKEN_ID,
    GenerationParams,
    UnsupportedFeature,
    UpstreamError,
    load_backend,
)
from inferledger.inference.openai_http import OpenAIHTTPBackend, iter_sse_data

CHAT = [{"role": "user", "content": "hi"}]


class Stub:
    """What the stub server answers next, and what it was asked."""

    def __init__(self) -> None:
        self.status = 200
        self.events: list[str] = []  # SSE data payloads; "[DONE]" is appended by the test
        self.requests: list[dict] = []


def make_handler(stub: Stub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            stub.requests.append(
                {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
            )
            self.send_response(stub.status)
            if stub.status != 200:
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"error": {"message": "model overloaded"}}')
                return
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b": keep-alive comment\n\n")
            for payload in stub.events:
                self.wfile.write(f"data: {payload}\n\n".encode())
                self.wfile.flush()

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def stub() -> Iterator[tuple[Stub, str]]:
    state = Stub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def chunk(content=None, finish=None, logprobs=None, usage=None, choices=True) -> str:
    body: dict = {"object": "chat.completion.chunk"}
    if choices:
        delta = {} if content is None else {"content": content}
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        if logprobs is not None:
            choice["logprobs"] = {"content": logprobs}
        body["choices"] = [choice]
    else:
        body["choices"] = []
    if usage is not None:
        body["usage"] = usage
    return json.dumps(body)


def test_request_carries_params_and_llama_cpp_ids_are_used(stub):
    state, url = stub
    state.events = [
        chunk(content=""),  # role-only first chunk, no token
        chunk("Hel", logprobs=[{"id": 15, "token": "Hel", "logprob": -0.1}]),
        chunk("lo", logprobs=[{"id": 16, "token": "lo", "logprob": -0.2}]),
        chunk(finish="length"),
        chunk(choices=False, usage={"prompt_tokens": 9, "completion_tokens": 2}),
        "[DONE]",
    ]
    backend = OpenAIHTTPBackend(url, "smol", api_key="sk-test")
    params = GenerationParams(max_tokens=2, temperature=0.5, top_p=0.9, seed=11, stop=["\n"])
    tokens, finish = collect(backend.generate(CHAT, params))
    backend.close()

    assert [(t.token_id, t.text) for t in tokens] == [(15, "Hel"), (16, "lo")]
    assert (finish.reason, finish.prompt_tokens) == ("length", 9)
    request = state.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == "Bearer sk-test"
    body = request["body"]
    assert body["stream"] is True and body["logprobs"] is True
    assert body["messages"] == CHAT
    assert (body["model"], body["max_tokens"], body["temperature"]) == ("smol", 2, 0.5)
    assert (body["top_p"], body["seed"], body["stop"]) == (0.9, 11, ["\n"])


def test_base_url_may_end_in_v1_and_extra_body_is_sent(stub):
    state, url = stub
    state.events = [chunk("x", finish="stop"), "[DONE]"]
    backend = OpenAIHTTPBackend(
        url + "/v1/", "m", request_logprobs=False, extra_body={"return_tokens_as_token_ids": True}
    )
    collect(backend.generate(CHAT, GenerationParams()))
    assert state.requests[0]["path"] == "/v1/chat/completions"
    assert state.requests[0]["body"]["return_tokens_as_token_ids"] is True
    assert "logprobs" not in state.requests[0]["body"]


def test_vllm_token_id_strings_are_parsed_and_delta_text_is_kept(stub):
    state, url = stub
    state.events = [
        chunk(" Paris", logprobs=[{"token": "token_id:3681", "logprob": -0.01}]),
        chunk(".", logprobs=[{"token": "token_id:13", "logprob": -0.3}], finish="stop"),
        "[DONE]",
    ]
    tokens, finish = collect(OpenAIHTTPBackend(url, "m").generate(CHAT, GenerationParams()))
    assert [(t.token_id, t.text) for t in tokens] == [(3681, " Paris"), (13, ".")]
    assert finish.reason == "stop"


def test_without_logprobs_each_chunk_counts_as_one_unknown_token(stub):
    state, url = stub
    state.events = [chunk("a"), chunk("bc"), chunk(""), chunk("d", finish="stop"), "[DONE]"]
    tokens, finish = collect(OpenAIHTTPBackend(url, "m").generate(CHAT, GenerationParams()))
    assert [(t.token_id, t.text) for t in tokens] == [
        (UNKNOWN_TOKEN_ID, "a"),
        (UNKNOWN_TOKEN_ID, "bc"),
        (UNKNOWN_TOKEN_ID, "d"),
    ]
    assert (finish.reason, finish.prompt_tokens) == ("stop", None)


def test_several_logprob_entries_in_one_chunk_become_several_tokens(stub):
    state, url = stub
    entries = [{"id": 1, "token": "ab"}, {"id": 2, "token": "c"}]
    state.events = [chunk("abc", logprobs=entries, finish="stop"), "[DONE]"]
    tokens, _ = collect(OpenAIHTTPBackend(url, "m").generate(CHAT, GenerationParams()))
    assert [(t.token_id, t.text) for t in tokens] == [(1, "ab"), (2, "c")]


def test_upstream_that_ignores_max_tokens_is_cut_off(stub):
    state, url = stub
    state.events = [chunk(str(i)) for i in range(6)] + [chunk(finish="stop"), "[DONE]"]
    backend = OpenAIHTTPBackend(url, "m")
    tokens, finish = collect(backend.generate(CHAT, GenerationParams(max_tokens=3)))
    assert [t.text for t in tokens] == ["0", "1", "2"]
    assert finish.reason == "length"


def test_http_error_is_an_upstream_error_with_the_status(stub):
    state, url = stub
    state.status = 503
    with pytest.raises(UpstreamError, match=r"503.*overloaded"):
        collect(OpenAIHTTPBackend(url, "m").generate(CHAT, GenerationParams()))


def test_stream_without_finish_reason_is_an_error(stub):
    state, url = stub
    state.events = [chunk("a"), "[DONE]"]
    with pytest.raises(UpstreamError, match="finish_reason"):
        collect(OpenAIHTTPBackend(url, "m").generate(CHAT, GenerationParams()))


def test_error_event_mid_stream_is_an_error(stub):
    state, url = stub
    state.events = [chunk("a"), json.dumps({"error": {"message": "boom"}})]
    with pytest.raises(UpstreamError, match="boom"):
        collect(OpenAIHTTPBackend(url, "m").generate(CHAT, GenerationParams()))


def test_connection_refused_is_an_upstream_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before the request: nobody listens
    backend = OpenAIHTTPBackend(f"http://127.0.0.1:{port}", "m", timeout=5)
    with pytest.raises(UpstreamError, match="request failed"):
        collect(backend.generate(CHAT, GenerationParams()))


def test_no_tokenizer_and_no_hidden_states():
    backend = load_backend("openai_http", base_url="http://127.0.0.1:9", model="m")
    assert backend.supports_hidden_states is False
    assert backend.weights_path is None
    with pytest.raises(UnsupportedFeature):
        backend.tokenize_chat(CHAT)
    with pytest.raises(UnsupportedFeature):
        backend.generate(CHAT, GenerationParams(), capture_hidden_states=True)
    with pytest.raises(UnsupportedFeature):
        backend.prefill_hidden_states([1, 2])
    backend.close()


def test_sse_parser_handles_comments_multiline_data_and_other_fields():
    lines = [": ping", "event: message", 'data: {"a":', "data: 1}", "", "data:[DONE]", ""]
    assert list(iter_sse_data(lines)) == ['{"a":\n1}', "[DONE]"]
