"""The llama.cpp backend: the same prompts, rules and states as transformers, and
generations that share decode steps without changing a token.

The session-level tests (a llama.cpp host paid and verified by a transformers prefill on
both chains, a changed token failing) are in tests/node/test_node_smollm.py.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from inferledger.inference import Backend, GenerationParams, Hidden, Token

pytest.importorskip("llama_cpp", reason="the llama extra: bash scripts/llama-wheel.sh")

CHAT = [{"role": "user", "content": "Name three rivers in Europe."}]
SAMPLED = GenerationParams(max_tokens=24, temperature=0.7, top_p=0.95, seed=7)


def run(backend: Backend, messages: Any = CHAT, params: GenerationParams = SAMPLED) -> tuple:
    tokens, rows = [], []
    for event in backend.generate(messages, params, capture_hidden_states=True):
        if isinstance(event, Token):
            tokens.append(event.token_id)
        elif isinstance(event, Hidden):
            rows.append(event.rows)
    return tokens, np.concatenate(rows)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_prompts_are_the_transformers_ids_and_states_are_the_final_norm_rows(
    llama: Backend, smollm: Backend
) -> None:
    prompt = smollm.tokenize_chat(CHAT)
    assert llama.tokenize_chat(CHAT) == prompt
    tokens, rows = run(llama)
    assert rows.shape == (len(prompt) + len(tokens), llama.hidden_size)  # type: ignore[attr-defined]
    reference = smollm.prefill_hidden_states([*prompt, *tokens])
    # The quantized GGUF against its float32 dequantization: close, not equal. The wrong
    # rows (pre-norm, or the AMX kernels' wrong logits) were at cosine 0.05-0.2.
    assert cosines(rows, reference).min() > 0.99
    assert (llama.engine, llama.dtype, llama.sampler) == ("llama_cpp", "q8_0", smollm.sampler)


def test_a_generation_decoded_with_others_is_the_one_decoded_alone(llama: Any) -> None:
    alone, alone_rows = run(llama)
    engine = llama._engine
    real = engine._lib

    class HoldFirstDecode:
        """llama.cpp, except that the first decode waits until every caller not in it is
        queued, so the next decode takes all of them: batching without timing."""

        def __init__(self) -> None:
            self.held = False
            self.orders: list[list[int]] = []

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def llama_decode(self, ctx: Any, batch: Any) -> int:
            self.orders.append([batch.seq_id[i][0] for i in range(batch.n_tokens)])
            if not self.held:
                self.held = True
                held = len({batch.seq_id[i][0] for i in range(batch.n_tokens)})
                wait_until(lambda: held + len(engine._waiting) >= 4, "callers never queued")
            return int(real.llama_decode(ctx, batch))

    engine._lib = spy = HoldFirstDecode()
    shared = llama.engine_stats[1]
    results: list[tuple | None] = [None] * 4
    try:
        workers = [
            threading.Thread(target=lambda i=i: results.__setitem__(i, run(llama)))
            for i in range(4)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(300)
    finally:
        engine._lib = real
    assert llama.engine_stats[1] - shared >= 3  # some decodes carried several sequences
    # In sequence order: llama.cpp splits any other batch into a decode per sequence.
    assert all(order == sorted(order) for order in spy.orders)
    for result in results:
        assert result is not None
        tokens, rows = result
        assert tokens == alone
        np.testing.assert_array_equal(rows, alone_rows)


def wait_until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_generation_closed_early_gives_its_sequence_back(llama: Any) -> None:
    engine = llama._engine
    started = [llama.generate(CHAT, SAMPLED) for _ in range(4)]
    for stream in started:
        next(stream)
    assert len(engine._resident) == 4  # every sequence taken
    for stream in started:
        stream.close()
    wait_until(lambda: not engine._resident, "closed generations still hold sequences")
    first = run(llama)[0]
    assert first == run(llama)[0]  # each cache was cleared: the same answer again


def test_more_generations_than_sequences_take_turns_and_lose_nothing(llama: Any) -> None:
    """One sequence, three generations stepped in turn (as replies paused for receipts
    resume): each step moves another's cache out and this one's back in."""
    from inferledger.inference.llama_cpp_backend import LlamaCppBackend

    alone = run(llama)
    other = [{"role": "user", "content": "Say something about winter."}]
    other_alone = run(llama, other)
    narrow = LlamaCppBackend(num_threads=1, sequences=1, context_length=512)
    try:
        streams = [
            narrow.generate(messages, SAMPLED, capture_hidden_states=True)
            for messages in (CHAT, other, CHAT)
        ]
        events: list[list[Any]] = [[], [], []]
        live = set(range(3))
        while live:  # strict turns: every step of one comes between steps of the others
            for index in sorted(live):
                event = next(streams[index], None)
                if event is None:
                    live.discard(index)
                else:
                    events[index].append(event)
        assert narrow.engine_stats[2] >= 20  # caches were moved out and back, many times
    finally:
        narrow.close()
    for got, (tokens, rows) in zip(events, [alone, other_alone, alone], strict=True):
        assert [e.token_id for e in got if isinstance(e, Token)] == tokens
        np.testing.assert_array_equal(
            np.concatenate([e.rows for e in got if isinstance(e, Hidden)]), rows
        )


def test_a_prompt_beyond_the_context_is_refused_before_anything_runs(llama: Any) -> None:
    long = [{"role": "user", "content": "word " * 3000}]
    with pytest.raises(ValueError, match="the context holds 2048"):
        llama.generate(long, SAMPLED)
    with pytest.raises(ValueError, match="exceed the context"):
        llama.prefill_hidden_states([1] * 2049)


def test_the_head_gives_the_logits_llama_cpp_sampled_from(llama: Any, smollm: Any) -> None:
    """A llama.cpp verifier's head (the GGUF's tied output matrix) picks, from its own
    rows, what transformers' head picks from the same rows."""
    prompt = smollm.tokenize_chat(CHAT)
    rows = llama.prefill_hidden_states(prompt)
    ours, theirs = llama.logits(rows), smollm.logits(rows)
    assert ours.shape == (len(prompt), 49152)
    assert (ours.argmax(1) == theirs.argmax(1)).all()
