"""What a client may send a node: the frames, their schemas and the one parser.

Every inbound frame is parsed here into a typed model, so the node never touches raw
JSON. Anything malformed becomes a ``ProtocolError`` carrying one of the documented
error codes (docs/protocol.md lists them all). The SDK builds its frames from the same
models, so the two sides cannot drift apart.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from inferledger.protocol.codes import ErrorCode, ProtocolError

# Tokens a chat template may add around the messages (role markers, a default system
# prompt); see ``prompt_token_bound``.
TEMPLATE_ALLOWANCE = 64

# The node keeps session ids and token counts in SQLite, whose integers are int64: every
# integer a client sends is bounded by it, so none can overflow a column or a comparison.
INT64_MAX = 2**63 - 1

Int64 = Annotated[int, Field(ge=0, le=INT64_MAX)]  # a token count, a seed
PositiveInt64 = Annotated[int, Field(gt=0, le=INT64_MAX)]  # a session id, max_tokens


class _Frame(BaseModel):
    # Strict: JSON `true`, `1.0` or `"5"` is not an integer, and a float is a finite number.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _hex_bytes(value: str, length: int, what: str) -> str:
    if not value.startswith("0x"):
        raise ValueError(f"{what} must be a 0x-prefixed hex string")
    try:
        raw = bytes.fromhex(value[2:])
    except ValueError as exc:
        raise ValueError(f"{what} is not valid hex") from exc
    if len(raw) != length:
        raise ValueError(f"{what} must be {length} bytes, got {len(raw)}")
    return value.lower()


Hex32 = Annotated[str, AfterValidator(lambda v: _hex_bytes(v, 32, "value"))]
Signature = Annotated[str, AfterValidator(lambda v: _hex_bytes(v, 65, "signature"))]


class KeyShare(_Frame):
    """The client's ephemeral channel key: every frame after this one, both ways, is sealed
    (docs/protocol.md, "Encryption"). Sent first, in plaintext, right after the challenge."""

    type: Literal["key_share"]
    client_key: Hex32


class SessionInit(_Frame):
    """Log in to a session: the session signer's EIP-712 answer to the challenge, and the
    session's secret salt, which the node mixes into every public proof bundle."""

    type: Literal["session_init"]
    session_id: PositiveInt64
    nonce: Hex32
    signature: Signature
    salt: Hex32


class ChatMessage(_Frame):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=32_000)


class Prompt(_Frame):
    """Ask for one reply. ``max_tokens`` None: as many as context and budget allow."""

    type: Literal["prompt"]
    request_id: str = Field(min_length=1, max_length=64)
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: PositiveInt64 | None = None
    temperature: float = Field(default=0.0, ge=0, le=5)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: Int64 | None = None
    stop: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=8
    )
    repetition_penalty: float = Field(default=1.0, ge=1, le=2)


class ReceiptFrame(_Frame):
    """The session signer's signature over (session, cumulative input and output tokens,
    proof hash): the EIP-712 ``Receipt`` JobMarketplace pays."""

    type: Literal["receipt"]
    input_tokens: Int64
    output_tokens: Int64
    proof_hash: Hex32
    signature: Signature


class End(_Frame):
    """The client is done with the session."""

    type: Literal["end"]


class Ping(_Frame):
    type: Literal["ping"]


ClientFrame = Annotated[
    KeyShare | SessionInit | Prompt | ReceiptFrame | End | Ping, Field(discriminator="type")
]
CLIENT_FRAME_TYPES = ("key_share", "session_init", "prompt", "receipt", "end", "ping")
_client_frame = TypeAdapter(ClientFrame)


def parse_client_frame(
    text: str | bytes, max_bytes: int
) -> KeyShare | SessionInit | Prompt | ReceiptFrame | End | Ping:
    """Parse one inbound frame or raise ProtocolError with the right code."""
    size = len(text.encode() if isinstance(text, str) else text)
    if size > max_bytes:
        raise ProtocolError(
            ErrorCode.FRAME_TOO_LARGE, f"frame is {size} bytes; the limit is {max_bytes}"
        )
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"frame is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # `[[[[...` deeper than the parser's stack
        raise ProtocolError(ErrorCode.BAD_FRAME, "frame nests too deeply to be a frame") from exc
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise ProtocolError(ErrorCode.BAD_FRAME, "frame must be a JSON object with a string 'type'")
    if data["type"] not in CLIENT_FRAME_TYPES:
        raise ProtocolError(
            ErrorCode.UNKNOWN_TYPE,
            f"unknown frame type {data['type']!r}; expected one of {', '.join(CLIENT_FRAME_TYPES)}",
        )
    try:
        return _client_frame.validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or data["type"]
        raise ProtocolError(
            ErrorCode.BAD_FRAME, f"bad {data['type']} frame: {where}: {first['msg']}"
        ) from exc


def client_frame_schemas() -> dict[str, dict[str, Any]]:
    """JSON schema of each inbound frame, by type (published in docs/protocol.md)."""
    models: dict[str, type[BaseModel]] = {
        "key_share": KeyShare,
        "session_init": SessionInit,
        "prompt": Prompt,
        "receipt": ReceiptFrame,
        "end": End,
        "ping": Ping,
    }
    return {name: model.model_json_schema() for name, model in models.items()}


def prompt_token_bound(messages: Iterable[Mapping[str, str]]) -> int:
    """The most input tokens an honest node can bill for ``messages``.

    A byte-level BPE token covers at least one byte, so a chat's tokens are at most its
    canonical JSON's bytes (which exceed the UTF-8 bytes of the contents and carry more
    per-message overhead than a chat template's role markers) plus ``TEMPLATE_ALLOWANCE``
    for a default system prompt. A node without a tokenizer bills exactly the JSON bytes.
    The SDK refuses to sign a receipt whose input count grew by more than this.
    """
    canonical = json.dumps(
        [dict(m) for m in messages], sort_keys=True, separators=(",", ":")
    ).encode()
    return len(canonical) + TEMPLATE_ALLOWANCE
