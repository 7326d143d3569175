"""A fake model for protocol and load tests: deterministic tokens at a chosen speed.

Output depends only on the chat and the seed, so two nodes (or a node and a verifier) agree.

Tokenizer: prompt ids are the UTF-8 bytes (0-255) of a simple rendering of the chat;
generated ids are ``256 + word index`` into the word list.

Hidden states: deterministic pseudo-states, not activations. The row for position ``i`` is
drawn from a RNG seeded by a hash chain over ``token_ids[: i + 1]``, so it depends on the whole
prefix exactly as a causal model's would, and capture during generation equals a prefill over
the same ids bit for bit. Good enough to exercise proof plumbing; it proves nothing about a model.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Generator, Sequence
from pathlib import Path

import numpy as np

from inferledger.inference.base import (
    Event,
    Finish,
    FinishReason,
    GenerationParams,
    Hidden,
    Message,
    validate_messages,
)
from inferledger.inference.textstream import TokenStream

DEFAULT_WORDS = (
    "The", " ledger", " records", " every", " token", " that", " the", " model", " writes",
    ",", " and", " each", " receipt", " is", " signed", " by", " both", " parties", ".", "\n",
)  # fmt: skip
WORD_ID_OFFSET = 256


class ScriptedBackend:
    """Deterministic token stream; ``tokens_per_second=0`` means as fast as possible."""

    supports_hidden_states = True
    engine = "scripted"
    dtype = "float32"
    sampler = "scripted"  # tokens follow the script, not logits: nothing to recompute
    weights_path: Path | None = None

    def __init__(
        self,
        *,
        tokens_per_second: float = 0.0,
        words: Sequence[str] = DEFAULT_WORDS,
        output_tokens: int | None = None,
        hidden_size: int = 128,
        name: str = "scripted/words",
    ) -> None:
        if tokens_per_second < 0:
            raise ValueError("tokens_per_second must be >= 0")
        if not words or any(not w for w in words):
            raise ValueError("words must be non-empty strings")
        self.tokens_per_second = tokens_per_second
        self.words = tuple(words)
        self.output_tokens = output_tokens
        """Natural answer length (then ``stop``); ``None`` runs until ``max_tokens``."""
        self.hidden_size = hidden_size
        self.name = name

    def tokenize_chat(self, messages: Sequence[Message]) -> list[int]:
        rendered = "".join(
            f"<{m['role']}>{m['content']}</{m['role']}>" for m in validate_messages(messages)
        )
        return list((rendered + "<assistant>").encode())

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of generated ids (prompt byte ids are not decodable words)."""
        return "".join(self.words[i - WORD_ID_OFFSET] for i in token_ids)

    def generate(
        self,
        messages: Sequence[Message],
        params: GenerationParams,
        *,
        capture_hidden_states: bool = False,
    ) -> Generator[Event, None, None]:
        prompt_ids = self.tokenize_chat(messages)
        return self._generate(prompt_ids, params, capture_hidden_states)

    def _generate(
        self, prompt_ids: list[int], params: GenerationParams, capture: bool
    ) -> Generator[Event, None, None]:
        start = _first_word(prompt_ids, params.seed, len(self.words))
        stream = TokenStream(self.decode, params.stop)
        states = _PseudoStates(self.hidden_size)
        generated: list[int] = []
        reason: FinishReason = "length"
        began = time.monotonic()
        step_input = prompt_ids
        while len(generated) < params.max_tokens:
            if capture:
                yield Hidden(states.fed, states.feed(step_input))
            if self.output_tokens is not None and len(generated) >= self.output_tokens:
                reason = "stop"
                break
            self._wait_for_slot(began, len(generated))
            token_id = WORD_ID_OFFSET + (start + len(generated)) % len(self.words)
            generated.append(token_id)
            yield from stream.push(token_id)
            if stream.stopped:
                reason = "stop"
                break
            step_input = [token_id]
        yield from stream.finish()
        if capture and states.fed < len(prompt_ids) + len(generated):
            yield Hidden(states.fed, states.feed(generated[-1:]))
        yield Finish(reason=reason, prompt_tokens=len(prompt_ids))

    def prefill_hidden_states(self, token_ids: Sequence[int]) -> np.ndarray:
        return _PseudoStates(self.hidden_size).feed(token_ids)

    def close(self) -> None:
        """Nothing to release."""

    def _wait_for_slot(self, began: float, index: int) -> None:
        """Sleep until token ``index`` is due; scheduling from the start avoids drift."""
        if self.tokens_per_second == 0:
            return
        delay = began + index / self.tokens_per_second - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class _PseudoStates:
    """The pseudo-state rows of a growing sequence, one hash-chain step per position."""

    def __init__(self, hidden_size: int) -> None:
        self.hidden_size = hidden_size
        self.fed = 0
        self._chain = b""

    def feed(self, token_ids: Sequence[int]) -> np.ndarray:
        rows = np.empty((len(token_ids), self.hidden_size), dtype=np.float32)
        for i, token_id in enumerate(token_ids):
            self._chain = hashlib.sha256(
                self._chain + int(token_id).to_bytes(8, "big", signed=True)
            ).digest()
            rng = np.random.default_rng(int.from_bytes(self._chain[:8], "big"))
            rows[i] = rng.standard_normal(self.hidden_size, dtype=np.float32)
        self.fed += len(token_ids)
        return rows


def _first_word(prompt_ids: list[int], seed: int | None, size: int) -> int:
    """Where in the word list this request starts: a pure function of prompt and seed."""
    key = json.dumps([prompt_ids, seed]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % size
