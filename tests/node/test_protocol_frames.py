"""Frame parsing, and the docs staying in step with the code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from inferledger.protocol.client import client_frame_schemas, parse_client_frame
from inferledger.protocol.codes import ErrorCode, ProtocolError
from inferledger.protocol.server import (
    NodeFrameError,
    Pong,
    TokenFrame,
    TokensFrame,
    dump_json,
    node_frame_schemas,
    parse_node_frame,
    parse_node_frames,
    token_frame_json,
)

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("[1, 2]", ErrorCode.BAD_FRAME),
        ('{"type": 5}', ErrorCode.BAD_FRAME),
        ('{"type": "prompt", "request_id": "", "messages": []}', ErrorCode.BAD_FRAME),
        (
            '{"type": "receipt", "input_tokens": 0, "output_tokens": 1, "proof_hash": "0x12", '
            '"signature": "0x"}',
            ErrorCode.BAD_FRAME,
        ),
        (
            '{"type": "session_init", "session_id": 1e80, "nonce": "0x", "signature": "0x"}',
            ErrorCode.BAD_FRAME,
        ),
        ('{"type": "end", "extra": 1}', ErrorCode.BAD_FRAME),
        ('{"type": "wat"}', ErrorCode.UNKNOWN_TYPE),
        ("x" * 2000, ErrorCode.FRAME_TOO_LARGE),
    ],
)
def test_bad_frames_get_their_code(raw: str, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_client_frame(raw, max_bytes=1024)
    assert info.value.code == code


def test_a_valid_prompt_parses_with_defaults() -> None:
    frame = parse_client_frame(
        '{"type": "prompt", "request_id": "a", "messages": [{"role": "user", "content": "hi"}]}',
        max_bytes=1024,
    )
    assert frame.type == "prompt"
    assert frame.max_tokens is None and frame.temperature == 0.0


def test_docs_list_every_error_code() -> None:
    text = (DOCS / "protocol.md").read_text()
    missing = [code.value for code in ErrorCode if f"`{code.value}`" not in text]
    assert missing == []


def test_published_schemas_match_the_code() -> None:
    published = json.loads((DOCS / "protocol-schemas.json").read_text())
    current = {"client": client_frame_schemas(), "node": node_frame_schemas()}
    assert published == json.loads(json.dumps(current))


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        '{"type": "wat"}',
        '{"type": "token", "request_id": "r", "index": 0, "token_id": 1, "text": ""}',
        '{"type": "receipt_request", "session_id": 1, "input_tokens": -1, "output_tokens": 1}',
        '{"type": "tokens", "request_id": "r", "index": 1, "token_ids": [], "texts": []}',
        '{"type": "tokens", "request_id": "r", "index": 1, "token_ids": [1, 2], "texts": ["a"]}',
        '{"type": "tokens", "request_id": "r", "index": 0, "token_ids": [1], "texts": ["a"]}',
        '{"type": "tokens", "request_id": "r", "index": 9223372036854775807, '
        '"token_ids": [1, 2], "texts": ["a", "b"]}',
    ],
)
def test_a_malformed_node_frame_is_a_protocol_error_on_the_client(raw: str) -> None:
    with pytest.raises(NodeFrameError):
        parse_node_frame(raw)


PONG = '{"type": "pong"}'


@pytest.mark.parametrize(
    "raw",
    [
        "[]",  # an empty batch
        f"[{PONG}, [{PONG}]]",  # nested
        f'[{PONG}, {{"type": "wat"}}]',  # one bad frame spoils the message
        f'[{PONG}, "pong"]',
    ],
)
def test_a_malformed_batch_of_node_frames_is_a_protocol_error_on_the_client(raw: str) -> None:
    with pytest.raises(NodeFrameError):
        parse_node_frames(raw)


def test_a_batch_is_its_frames_in_order_and_only_where_several_may_come() -> None:
    ack = '{"type": "receipt_ack", "input_tokens": 3, "output_tokens": 4}'
    frames = parse_node_frames(f"[{ack}, {PONG}]")
    assert [f.type for f in frames] == ["receipt_ack", "pong"]
    assert parse_node_frames(PONG) == [Pong()]
    # The challenge comes alone, before the channel: nothing may ride with it in clear.
    with pytest.raises(NodeFrameError, match="2 frames where one was due"):
        parse_node_frame(f"[{PONG}, {PONG}]")


@pytest.mark.parametrize("count", [1, 2, 17])
def test_the_fast_token_encoding_is_the_frame_models_json(count: int) -> None:
    ids = list(range(256, 256 + count))
    texts = [f' w\u00e9rd{i}"\n' for i in range(count)]
    raw = token_frame_json("r-1", 5, ids, texts)
    if count == 1:
        model: Any = TokenFrame(request_id="r-1", index=5, token_id=ids[0], text=texts[0])
    else:
        model = TokensFrame(request_id="r-1", index=5, token_ids=ids, texts=texts)
    assert raw == dump_json(model.dump())
    assert parse_node_frame(raw) == model
