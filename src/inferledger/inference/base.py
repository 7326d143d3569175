"""The contract every inference backend meets.

The node runs generation in a worker thread, so the API is a plain synchronous iterator:
``generate()`` yields one :class:`Token` per generated token and ends with one :class:`Finish`.
Keeping it synchronous lets each backend stay simple; the node owns the thread hand-off.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, TypedDict, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

FinishReason = Literal["stop", "length"]
"""``stop``: end-of-sequence token or stop string; ``length``: ``max_tokens`` or context full.

The node adds a third reason, ``budget``, when it cuts a stream short; backends never emit it.
"""

UNKNOWN_TOKEN_ID = -1
"""Token id used when an upstream server does not report real ids (see ``openai_http``)."""

ROLES = frozenset({"system", "user", "assistant"})


class Message(TypedDict):
    role: str
    content: str


class BackendError(RuntimeError):
    """Base class for errors raised by backends."""


class BackendUnavailable(BackendError):
    """The backend cannot run here: a package or a weights file is missing."""


class UnsupportedFeature(BackendError):
    """The backend cannot do what was asked (e.g. hidden states from a remote server)."""


class UpstreamError(BackendError):
    """A remote server failed or answered with something we cannot use."""


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """Sampling settings for one request. ``temperature == 0`` means greedy decoding; the
    sampler (``inference.sampling``) is a pure function of these, so ``seed`` (None: 0)
    makes a sampled reply checkable by anyone holding it."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not 1 <= self.repetition_penalty <= 2:
            raise ValueError("repetition_penalty must be in [1, 2]")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError("seed must be in [0, 2**63)")
        if isinstance(self.stop, str):
            # A bare string would otherwise be read as a tuple of one-character stops.
            raise TypeError("stop must be a sequence of strings, not a string")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        object.__setattr__(self, "stop", tuple(self.stop))


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token.

    ``text`` is the visible text this token adds. Joining every ``text`` of a stream gives the
    completion as the user should see it: text that turns out to start a stop string is held
    back and then dropped, so the tokens that spell a stop string carry less (or no) text.
    """

    token_id: int
    text: str


@dataclass(frozen=True, slots=True, eq=False)
class Hidden:
    """Final-norm hidden states just computed, streamed only when capture was requested.

    ``rows`` (float32, ``[n, hidden_size]``) are positions ``start .. start + n - 1`` of prompt +
    output: row ``i`` is the state after input token ``i``. The prompt's rows come before the
    first token; the row of generated token ``j`` (position ``prompt_tokens + j``) comes before
    token ``j + 1``, or before :class:`Finish` for the last token. A node can so build a proof
    for the tokens sent so far in the middle of a reply.
    """

    start: int
    rows: np.ndarray


@dataclass(frozen=True, slots=True)
class Finish:
    """Last event of a stream."""

    reason: FinishReason
    prompt_tokens: int | None = None


Event = Token | Hidden | Finish


@runtime_checkable
class Backend(Protocol):
    """What the node needs from a model runner.

    Implementations must tolerate ``generate()`` being called from several worker threads.
    """

    name: str
    """Human-readable model name, ``"source/file"`` style."""

    @property
    def weights_path(self) -> Path | None:
        """The weights file the node hashes (sha256) into its model id; ``None`` when remote."""
        ...

    supports_hidden_states: bool
    """Whether ``capture_hidden_states`` and ``prefill_hidden_states`` work."""

    engine: str
    """Which backend this is (``transformers``, ``scripted``, ``openai_http``): proof bundles
    name it as their ``backend``."""

    dtype: str
    """The dtype the model computes in (``float32``, ``bfloat16``): proof bundles name it, so a
    verifier picks the thresholds that fit."""

    sampler: str
    """How tokens are chosen: ``inference.sampling.SAMPLER`` when by the verifiable sampler,
    anything else (``scripted``, ``remote``) when a verifier cannot recompute the choice."""

    def tokenize_chat(self, messages: Sequence[Message]) -> list[int]:
        """Prompt token ids: chat template applied, assistant generation prompt appended."""
        ...

    def generate(
        self,
        messages: Sequence[Message],
        params: GenerationParams,
        *,
        capture_hidden_states: bool = False,
    ) -> Generator[Event, None, None]:
        """Yield :class:`Token` events, then exactly one :class:`Finish`.

        With ``capture_hidden_states``, :class:`Hidden` events carry every position's state
        as soon as it is computed, each position once, in order.

        The prompt is exactly ``tokenize_chat(messages)``. Closing the iterator early stops
        generation and frees its resources.
        """
        ...

    def prefill_hidden_states(self, token_ids: Sequence[int]) -> np.ndarray:
        """Final-norm hidden states of one prefill over ``token_ids`` (a verifier's run)."""
        ...

    def close(self) -> None:
        """Release network connections or other resources."""
        ...


def validate_messages(messages: Sequence[Message]) -> list[Message]:
    """Reject malformed chats early, with a message that says what is wrong."""
    if not messages:
        raise ValueError("messages must not be empty")
    checked: list[Message] = []
    for index, message in enumerate(messages):
        role = message.get("role")
        content = message.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{index}].role must be one of {sorted(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{index}].content must be a string")
        checked.append({"role": role, "content": content})
    return checked
