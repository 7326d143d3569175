"""What a node sends a client: one typed model per frame, shared by the node and the SDK.

The node builds these models and sends ``model_dump`` (several at once as a JSON array);
the SDK parses every inbound message with ``parse_node_frames``, so a frame the node would
not send (a missing field, a negative count) is a protocol error on the client, not a
``KeyError`` deep in its bookkeeping.
Their JSON schemas are published in docs/protocol-schemas.json next to the client frames.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from inferledger.protocol.client import INT64_MAX, Hex32, Int64, PositiveInt64, Signature

# Token counts, ids and session ids come from the node's SQLite (int64); the SDK packs token
# ids as int64 into the transcript hash. Money and the chain id are uint256 on chain.
Count = Int64
Amount = Annotated[int, Field(ge=0, le=2**256 - 1)]


class _NodeFrame(BaseModel):
    # Extra fields are ignored, so a newer node may add some without breaking older clients.
    model_config = ConfigDict(extra="ignore", frozen=True)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class Challenge(_NodeFrame):
    """The first frame: who the node is, the nonce the login must sign, and the node's
    ephemeral channel key, with the host key's ``HostChallenge`` signature over both.
    ``plaintext``: this node would also take an unencrypted session (dev chains only)."""

    type: Literal["challenge"] = "challenge"
    protocol: int
    nonce: Hex32
    host: str
    chain_id: Amount
    marketplace: str
    model: str
    node_key: Hex32
    host_signature: Signature
    plaintext: bool = False


class ReplayedToken(BaseModel):
    """A token streamed after the last receipt, sent again on resume so the client can
    check (or learn) it before it signs."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    index: PositiveInt64
    token_id: Count
    text: str


class SessionReady(_NodeFrame):
    """Login accepted. ``receipted_*`` are the last signed receipt's counts and
    ``transcript_hash`` the chain over its output tokens; ``served_*`` is everything the
    node has served, and ``replay`` the output tokens between the two. When served exceeds
    receipted, a ``receipt_request`` for the served counts follows, and no prompt is taken
    until it is signed."""

    type: Literal["session_ready"] = "session_ready"
    session_id: PositiveInt64
    model: str
    deposit: Amount
    input_price_per_mtok: Amount
    output_price_per_mtok: Amount
    proof_interval: int
    max_unreceipted_tokens: int
    receipted_input_tokens: Count
    receipted_output_tokens: Count
    served_input_tokens: Count
    served_output_tokens: Count
    transcript_hash: Hex32
    replay: list[ReplayedToken] = Field(default_factory=list)
    expires_at: int
    settles_at: int


class ReplyStart(_NodeFrame):
    """A prompt was accepted: its input tokens are now part of the session's bill."""

    type: Literal["reply_start"] = "reply_start"
    request_id: str
    prompt_tokens: Count
    input_tokens: Count


class TokenFrame(_NodeFrame):
    type: Literal["token"] = "token"
    request_id: str
    index: PositiveInt64
    token_id: Count
    text: str


class TokensFrame(_NodeFrame):
    """Several reply tokens in one frame: tokens ``index`` to ``index + len(token_ids) - 1``
    in order, ``texts[i]`` the text of ``token_ids[i]``; the same as that many ``token``
    frames. The node sends it for tokens that are ready together (the backend is ahead of
    the connection), a ``token`` frame for a token that is ready alone."""

    type: Literal["tokens"] = "tokens"
    request_id: str
    index: PositiveInt64
    token_ids: list[Count] = Field(min_length=1)
    texts: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_text_per_token(self) -> TokensFrame:
        if len(self.token_ids) != len(self.texts):
            raise ValueError(f"{len(self.token_ids)} token ids but {len(self.texts)} texts")
        if self.index + len(self.token_ids) - 1 > INT64_MAX:
            raise ValueError("token index beyond int64")
        return self


def token_frame_json(
    request_id: str, index: int, token_ids: Sequence[int], texts: Sequence[str]
) -> bytes:
    """The UTF-8 JSON of ``TokenFrame`` (one token) or ``TokensFrame`` (several) starting at
    ``index``, as their ``dump`` would give it, without building the model: the node's
    per-frame hot path (a test keeps the two equal)."""
    if len(token_ids) == 1:
        frame: dict[str, Any] = {
            "type": "token",
            "request_id": request_id,
            "index": index,
            "token_id": token_ids[0],
            "text": texts[0],
        }
    else:
        frame = {
            "type": "tokens",
            "request_id": request_id,
            "index": index,
            "token_ids": list(token_ids),
            "texts": list(texts),
        }
    return dump_json(frame)


def dump_json(frame: dict[str, Any]) -> bytes:
    """A frame's compact UTF-8 JSON, as the node sends it: by orjson, or by ``json`` for
    what orjson does not encode (an integer beyond 64 bits, such as a uint256 amount)."""
    try:
        return orjson.dumps(frame)
    except TypeError:
        return json.dumps(frame, separators=(",", ":"), ensure_ascii=False).encode()


class ReceiptRequest(_NodeFrame):
    """Sign ``Receipt(session_id, input_tokens, output_tokens, proof_hash)``: cumulative
    counts, and the newest proof bundle's hash (it may cover fewer output tokens)."""

    type: Literal["receipt_request"] = "receipt_request"
    session_id: PositiveInt64
    input_tokens: Count
    output_tokens: Count
    proof_hash: Hex32
    transcript_hash: Hex32
    proof_uri: str | None


class ReceiptAck(_NodeFrame):
    type: Literal["receipt_ack"] = "receipt_ack"
    input_tokens: Count
    output_tokens: Count


class Done(_NodeFrame):
    """A reply ended: ``finish_reason`` is stop, length, budget or closing."""

    type: Literal["done"] = "done"
    request_id: str
    finish_reason: str
    prompt_tokens: Count
    completion_tokens: Count
    input_tokens: Count
    output_tokens: Count


class SessionEnd(_NodeFrame):
    type: Literal["session_end"] = "session_end"
    session_id: PositiveInt64
    served_input_tokens: Count
    served_output_tokens: Count
    receipted_input_tokens: Count
    receipted_output_tokens: Count


class Settled(_NodeFrame):
    type: Literal["settled"] = "settled"
    session_id: PositiveInt64
    input_tokens: Count
    output_tokens: Count
    host_amount: Amount
    fee: Amount
    refund: Amount
    refund_credited: bool | None
    tx_hash: str | None


SETTLEMENT_GAVE_UP = "the node could not settle:"
"""How a node's last ``settlement_pending`` reason begins when it stopped trying."""


class SettlementPending(_NodeFrame):
    type: Literal["settlement_pending"] = "settlement_pending"
    session_id: PositiveInt64
    reason: str


class Pong(_NodeFrame):
    type: Literal["pong"] = "pong"


class ErrorFrame(_NodeFrame):
    type: Literal["error"] = "error"
    code: str
    message: str


NodeFrame = Annotated[
    Challenge
    | SessionReady
    | ReplyStart
    | TokenFrame
    | TokensFrame
    | ReceiptRequest
    | ReceiptAck
    | Done
    | SessionEnd
    | Settled
    | SettlementPending
    | Pong
    | ErrorFrame,
    Field(discriminator="type"),
]
NODE_FRAMES: dict[str, type[_NodeFrame]] = {
    model.model_fields["type"].default: model
    for model in (
        Challenge,
        SessionReady,
        ReplyStart,
        TokenFrame,
        TokensFrame,
        ReceiptRequest,
        ReceiptAck,
        Done,
        SessionEnd,
        Settled,
        SettlementPending,
        Pong,
        ErrorFrame,
    )
}
_node_frame: TypeAdapter[Any] = TypeAdapter(NodeFrame)


class NodeFrameError(ValueError):
    """A frame from the node that breaks the protocol (not JSON, unknown type, bad field)."""


def parse_node_frames(text: str | bytes) -> list[Any]:
    """One message from the node as its frames' typed models, in order: a message holds
    one frame, or a JSON array of frames (what the node had ready to send at once).
    NodeFrameError names what is wrong."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise NodeFrameError(f"node sent a frame that is not JSON: {exc}") from exc
    if not isinstance(data, list):
        return [_typed(data)]
    if not data:
        raise NodeFrameError("node sent an empty array of frames")
    return [_typed(item) for item in data]


def parse_node_frame(text: str | bytes) -> Any:
    """A message that must hold exactly one frame (``challenge`` does)."""
    frames = parse_node_frames(text)
    if len(frames) != 1:
        raise NodeFrameError(f"node sent {len(frames)} frames where one was due")
    return frames[0]


def _typed(data: Any) -> Any:
    kind = data.get("type") if isinstance(data, dict) else None
    if kind not in NODE_FRAMES:
        raise NodeFrameError(f"node sent an unknown frame type {kind!r}")
    try:
        return _node_frame.validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or kind
        raise NodeFrameError(f"node sent a bad {kind} frame: {where}: {first['msg']}") from exc


def node_frame_schemas() -> dict[str, dict[str, Any]]:
    """JSON schema of each frame a node sends, by type (published in docs)."""
    return {name: model.model_json_schema() for name, model in NODE_FRAMES.items()}
