"""The chat tokenizer every local backend shares, so prompts are the same ids everywhere.

A llama.cpp host and a transformers verifier must agree on the prompt's token ids, or a
bill and a proof would name different prompts. Both therefore tokenize with the tokenizer
saved next to the converted weights (``model_cache``), and end a turn on the same ids.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from pathlib import Path
from typing import cast

from transformers import AutoTokenizer, GenerationConfig

from inferledger.inference.base import Event, GenerationParams, Message, validate_messages
from inferledger.inference.decoding import check_room


class ChatTokenizer:
    """Chat template, decoding and end-of-turn ids of the model saved in ``model_dir``."""

    def __init__(self, model_dir: Path) -> None:
        self._tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        ids: set[int] = set()
        configured = GenerationConfig.from_pretrained(model_dir, local_files_only=True)
        eos = configured.eos_token_id
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(eos)
        if self._tokenizer.eos_token_id is not None:
            ids.add(self._tokenizer.eos_token_id)
        self.eos_ids: frozenset[int] = frozenset(ids)
        """Every id that ends a turn (generation config and tokenizer may differ)."""

    def tokenize_chat(self, messages: Sequence[Message]) -> list[int]:
        """Prompt token ids: chat template applied, assistant generation prompt appended."""
        # casts: a Message is a dict of str; tokenize=True, return_dict=False gives ids.
        ids = self._tokenizer.apply_chat_template(
            cast(list[dict[str, str]], validate_messages(messages)),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        return list(cast(list[int], ids))

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` exactly as generated (special tokens kept, no cleanup)."""
        # cast: one sequence of ids decodes to one string.
        return cast(
            str,
            self._tokenizer.decode(
                list(token_ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
            ),
        )


class ChatModel:
    """What every local backend does alike around its own decode: the shared tokenizer,
    and the context checked before a generation starts (so a too-long prompt fails at
    ``generate()``, not at the first event)."""

    _chat: ChatTokenizer
    context_length: int

    def tokenize_chat(self, messages: Sequence[Message]) -> list[int]:
        return self._chat.tokenize_chat(messages)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` exactly as generated (special tokens kept, no cleanup)."""
        return self._chat.decode(token_ids)

    def generate(
        self,
        messages: Sequence[Message],
        params: GenerationParams,
        *,
        capture_hidden_states: bool = False,
    ) -> Generator[Event, None, None]:
        prompt_ids = self.tokenize_chat(messages)
        room = check_room(len(prompt_ids), self.context_length)
        return self._generate(
            prompt_ids, params, min(params.max_tokens, room), capture_hidden_states
        )

    def _generate(
        self, prompt_ids: list[int], params: GenerationParams, limit: int, capture: bool
    ) -> Generator[Event, None, None]:
        raise NotImplementedError
