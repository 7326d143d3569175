"""The local record of a session: what only the client knows, kept on disk.

The chain holds the money; the node holds its receipts; only the client holds the
session signer key and the transcript (prompts and the token ids it received). The
record is rewritten atomically after every reply and before every receipt is sent,
so another process (the CLI) can resume, close or verify the session, and a receipt
the node holds is always covered by a record on disk.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, SecretStr, field_serializer

from inferledger.chain.receipts import ReceiptDomain, session_salt
from inferledger.paths import home, write_atomic
from inferledger.proofs.transcript import TranscriptHash
from inferledger.sdk.errors import SdkError
from inferledger.sdk.wire import Expectation, session_read_headers

RECORD_VERSION = 2


class ReceiptRecord(BaseModel):
    """A receipt the session signer signed: cumulative input and output (``tokens``)
    tokens and what it committed to."""

    input_tokens: int = 0
    tokens: int
    proof_hash: str
    transcript_hash: str
    proof_uri: str | None = None
    signature: str


class ReplyRecord(BaseModel):
    """One prompt and the tokens received for it.

    ``first_token`` is the session's token count before this reply, so the reply's
    tokens are the session's tokens ``first_token + 1 ..= first_token + len(token_ids)``.
    ``finish_reason`` is None while the reply streams or if it was cut off;
    ``prompt_tokens`` is None until the node has said what the prompt is billed.
    """

    request_id: str
    messages: list[dict[str, str]]
    params: dict[str, Any] = Field(default_factory=dict)
    first_token: int
    prompt_tokens: int | None = None
    token_ids: list[int] = Field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


class SessionRecord(BaseModel):
    version: int = RECORD_VERSION
    session_id: int
    chain_id: int
    chain_url: str
    marketplace: str
    depositor: str
    host: str
    model_id: str
    deposit: int
    input_price_per_mtok: int
    output_price_per_mtok: int
    proof_interval: int
    max_duration: int
    signer_key: SecretStr
    node_url: str
    created_at: float = Field(default_factory=time.time)
    created_block: int = 0
    request_seq: int = 0
    replies: list[ReplyRecord] = Field(default_factory=list)
    receipts: list[ReceiptRecord] = Field(default_factory=list)
    settlement: dict[str, Any] | None = None
    input_tokens: int = 0  # prompt tokens accepted as billed (the node's reply_start frames)

    @field_serializer("signer_key", when_used="json")
    def _reveal_key(self, key: SecretStr) -> str:
        # Written to the 0600 record file; shown nowhere else (repr and str print ******).
        return key.get_secret_value()

    @property
    def expectation(self) -> Expectation:
        """The receipt domain and host this session's messages are signed for."""
        return Expectation(ReceiptDomain(self.chain_id, self.marketplace), self.host)

    @property
    def salt(self) -> bytes:
        """The session's bundle salt: hand it to a verifier with the transcript, to nobody
        else (it lets its holder confirm guesses of the prompts; docs/proofs.md)."""
        key = self.signer_key.get_secret_value()
        return session_salt(key, self.expectation.domain, self.session_id)

    def read_headers(self) -> dict[str, str]:
        """Headers for the node's ``GET /v1/sessions/{id}``, which answers only the signer."""
        key = self.signer_key.get_secret_value()
        return session_read_headers(key, self.expectation, self.session_id)

    @property
    def tokens(self) -> int:
        """Tokens received in this session (billed or not yet)."""
        return sum(len(r.token_ids) for r in self.replies)

    def token_ids(self) -> list[int]:
        return [t for reply in self.replies for t in reply.token_ids]

    def transcript_hash(self, tokens: int | None = None) -> bytes:
        """The transcript hash over the first ``tokens`` ids (default all)."""
        transcript = TranscriptHash(self.session_id)
        for token_id in self.token_ids()[:tokens]:
            transcript.update(token_id)
        return transcript.value

    def truncate(self, tokens: int) -> None:
        """Keep only the first ``tokens`` tokens: the rest were streamed on a dropped
        connection after the last receipt and are neither billed nor part of the session."""
        kept: list[ReplyRecord] = []
        for reply in self.replies:
            room = tokens - reply.first_token
            if room <= 0 and reply.token_ids:
                break
            if room < len(reply.token_ids):
                reply.token_ids = reply.token_ids[:room]
                reply.finish_reason = None
            kept.append(reply)
        self.replies = kept
        self.receipts = [r for r in self.receipts if r.tokens <= tokens]

    def signed_counts(self) -> tuple[int, int]:
        """(input, output) counts of the newest receipt signed, (0, 0) before any."""
        if not self.receipts:
            return (0, 0)
        last = self.receipts[-1]
        return (last.input_tokens, last.tokens)


class RecordStore:
    """Session records as JSON files, one per session, readable only by their owner."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or home() / "sessions"
        self._lock = threading.Lock()

    def path(self, chain_id: int, marketplace: str, session_id: int) -> Path:
        return self.directory / f"{chain_id}-{marketplace.lower()}-{session_id}.json"

    def path_of(self, record: SessionRecord) -> Path:
        return self.path(record.chain_id, record.marketplace, record.session_id)

    def save(self, record: SessionRecord) -> Path:
        """Write then rename, so a crash never leaves half a record; mode 0600 (it holds a key)."""
        path = self.path_of(record)
        with self._lock:
            write_atomic(path, record.model_dump_json(indent=1).encode())
        return path

    def load(self, chain_id: int, marketplace: str, session_id: int) -> SessionRecord:
        path = self.path(chain_id, marketplace, session_id)
        try:
            return SessionRecord.model_validate_json(path.read_text())
        except FileNotFoundError:
            raise SdkError(
                f"no local record of session {session_id} in {self.directory}: only the "
                "process that opened a session holds its signer key and transcript"
            ) from None
        except ValueError as exc:
            raise SdkError(f"session record {path} is unreadable: {exc}") from exc

    def list(
        self, chain_id: int | None = None, marketplace: str | None = None
    ) -> list[SessionRecord]:
        """Records in this store, newest first, optionally for one chain and marketplace."""
        records = []
        for path in self.directory.glob("*.json") if self.directory.exists() else []:
            try:
                record = SessionRecord.model_validate(json.loads(path.read_text()))
            except ValueError:
                continue
            if chain_id is not None and record.chain_id != chain_id:
                continue
            if marketplace is not None and record.marketplace.lower() != marketplace.lower():
                continue
            records.append(record)
        return sorted(records, key=lambda r: r.created_at, reverse=True)
