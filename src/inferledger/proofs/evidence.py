"""What a challenger reveals to a dispute's jurors, and what it commits to on chain.

A dispute names one host-signed proof bundle (by its signing hash, which the host's
signature makes attributable) and commits to the session's transcript with
``keccak256(transcript bytes)``. The transcript travels off chain, only to the jurors the
dispute drew; a juror accepts exactly the bytes that hash to the commitment, so nobody else
can slip one in, and the challenger cannot change its story after opening.

The transcript holds what a verifier needs and nothing more: the prompts, the sampling
parameters and the token ids of each reply, and the session's bundle salt (which unmasks
the proofs and opens the prompt and seed commitments). It never holds the session signer
key the salt is derived from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import orjson
from eth_utils.crypto import keccak
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from inferledger.proofs.sampling import sampling_of
from inferledger.proofs.verify import ReplyTranscript

TRANSCRIPT_VERSION = 1
MAX_TRANSCRIPT_BYTES = 8 * 1024 * 1024
"""A juror reads no more than this: a session's text and ids fit many times over."""


class RevealedReply(BaseModel):
    """One prompt, what the user asked of the sampler, and the token ids it received;
    ``first_token`` is the session's token count before the reply."""

    model_config = ConfigDict(extra="forbid")

    messages: list[dict[str, str]]
    params: dict[str, Any] = Field(default_factory=dict)
    first_token: int = Field(ge=0)
    token_ids: list[int]


class Transcript(BaseModel):
    """A session as its depositor kept it, for the jurors of a dispute."""

    model_config = ConfigDict(extra="forbid")

    version: int = TRANSCRIPT_VERSION
    session_id: int = Field(ge=1)
    chain_id: int = Field(ge=1)
    marketplace: str
    host: str
    model_id: str
    salt: str = Field(pattern=r"^0x[0-9a-f]{64}$")
    replies: list[RevealedReply]

    def encode(self) -> bytes:
        """The bytes the commitment is over (sorted keys, so one transcript, one encoding)."""
        return orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)

    def commitment(self) -> bytes:
        """What the dispute records on chain: keccak256 of :meth:`encode`."""
        return keccak(self.encode())

    @property
    def salt_bytes(self) -> bytes:
        return bytes.fromhex(self.salt[2:])

    @classmethod
    def decode(cls, data: bytes, commitment: bytes) -> Transcript:
        """The transcript in ``data`` if it hashes to ``commitment``; ValueError naming what
        is wrong otherwise (too large, another transcript, not a transcript)."""
        if len(data) > MAX_TRANSCRIPT_BYTES:
            raise ValueError(f"the transcript is over {MAX_TRANSCRIPT_BYTES} bytes")
        if keccak(data) != commitment:
            raise ValueError(
                f"the transcript hashes to 0x{keccak(data).hex()}, not to the dispute's "
                f"commitment 0x{commitment.hex()}"
            )
        try:
            transcript = cls.model_validate_json(data)
        except ValidationError as exc:
            raise ValueError(f"not a transcript: {exc.errors()[0]['msg']}") from None
        if transcript.version != TRANSCRIPT_VERSION:
            raise ValueError(f"transcript version {transcript.version} is not {TRANSCRIPT_VERSION}")
        return transcript


Tokenize = Callable[[Sequence[dict[str, str]]], Sequence[int]]
"""Renders a reply's messages into prompt ids, as the host's chat template did."""


class KeptReply(Protocol):
    """A reply as a record keeps it (``sdk.records.ReplyRecord``, :class:`RevealedReply`)."""

    messages: list[dict[str, str]]
    params: dict[str, Any]
    first_token: int
    token_ids: list[int]


def reply_transcripts(replies: Iterable[KeptReply], tokenize: Tokenize) -> list[ReplyTranscript]:
    """The kept replies as the verifier sees them (empty replies left out)."""
    return [
        ReplyTranscript(
            prompt_ids=tuple(int(t) for t in tokenize(reply.messages)),
            reply_ids=tuple(reply.token_ids),
            first_token=reply.first_token,
            sampling=sampling_of(reply.params),
        )
        for reply in replies
        if reply.token_ids
    ]
