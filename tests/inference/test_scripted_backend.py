"""ScriptedBackend: deterministic output, pacing, finish reasons and pseudo hidden states."""

from __future__ import annotations

import time

import numpy as np
import pytest
from inference_support import collect, collect_with_states

from inferledger.inference import GenerationParams, load_backend
from inferledger.inference.base import Backend
from inferledger.inference.scripted import WORD_ID_OFFSET, ScriptedBackend

CHAT = [{"role": "user", "content": "hello"}]


def test_is_a_backend():
    assert isinstance(ScriptedBackend(), Backend)


def test_same_chat_and_seed_give_the_same_tokens_and_others_differ():
    backend = ScriptedBackend()
    params = GenerationParams(max_tokens=12, seed=3)
    first, _ = collect(backend.generate(CHAT, params))
    again, _ = collect(backend.generate(CHAT, params))
    other, _ = collect(backend.generate(CHAT, GenerationParams(max_tokens=12, seed=4)))
    assert first == again
    assert [t.token_id for t in first] != [t.token_id for t in other]


def test_max_tokens_gives_length_and_text_matches_ids():
    backend = ScriptedBackend()
    tokens, finish = collect(backend.generate(CHAT, GenerationParams(max_tokens=7)))
    assert len(tokens) == 7
    assert finish.reason == "length"
    assert finish.prompt_tokens == len(backend.tokenize_chat(CHAT))
    assert "".join(t.text for t in tokens) == backend.decode([t.token_id for t in tokens])
    assert all(t.token_id >= WORD_ID_OFFSET for t in tokens)


def test_natural_end_gives_stop():
    backend = ScriptedBackend(output_tokens=4)
    tokens, finish = collect(backend.generate(CHAT, GenerationParams(max_tokens=10)))
    assert (len(tokens), finish.reason) == (4, "stop")


def test_stop_string_ends_the_stream_and_is_not_shown():
    backend = ScriptedBackend(words=["a", "b", "c", "d"])
    # Pin where the cycle starts by finding it, then stop on the pair after the first token.
    tokens, _ = collect(backend.generate(CHAT, GenerationParams(max_tokens=8)))
    text = "".join(t.text for t in tokens)
    stop = text[2:4]
    stopped, finish = collect(backend.generate(CHAT, GenerationParams(max_tokens=8, stop=[stop])))
    assert finish.reason == "stop"
    assert "".join(t.text for t in stopped) == text[:2]
    assert [t.token_id for t in stopped] == [t.token_id for t in tokens[:4]]


def test_speed_is_paced():
    backend = ScriptedBackend(tokens_per_second=100)
    began = time.monotonic()
    tokens, _ = collect(backend.generate(CHAT, GenerationParams(max_tokens=11)))
    elapsed = time.monotonic() - began
    assert len(tokens) == 11
    assert 0.095 <= elapsed < 1.0  # 10 gaps of 10 ms


def test_zero_speed_is_unpaced():
    backend = ScriptedBackend(tokens_per_second=0)
    began = time.monotonic()
    collect(backend.generate(CHAT, GenerationParams(max_tokens=2000)))
    assert time.monotonic() - began < 2.0


def test_pseudo_hidden_states_match_prefill_and_depend_on_the_prefix():
    backend = ScriptedBackend(hidden_size=8)
    for params in (GenerationParams(max_tokens=5), GenerationParams(max_tokens=9, stop=["."])):
        tokens, _, states = collect_with_states(
            backend.generate(CHAT, params, capture_hidden_states=True)
        )
        ids = backend.tokenize_chat(CHAT) + [t.token_id for t in tokens]
        assert states.shape == (len(ids), 8)
        np.testing.assert_array_equal(states, backend.prefill_hidden_states(ids))
    changed = backend.prefill_hidden_states([ids[0] + 1, *ids[1:]])
    assert not np.any(np.all(changed == states, axis=1))


def test_factory_builds_scripted_with_options():
    backend = load_backend("scripted", tokens_per_second=5, name="scripted/x")
    assert isinstance(backend, ScriptedBackend)
    assert (backend.tokens_per_second, backend.name) == (5, "scripted/x")


def test_factory_rejects_unknown_names_and_lists_the_known_ones():
    for name in ("nope", "llama.cpp"):
        with pytest.raises(
            ValueError, match=r"unknown backend .* transformers, llama_cpp, scripted, openai_http"
        ):
            load_backend(name)
