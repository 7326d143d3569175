"""SmolLM2 (or any llama-family GGUF) run by llama.cpp, with proofs and shared decode steps.

What llama.cpp computes is the GGUF's computed copy (``computed_weights``: requantized to
Q8_0), the same tensors the transformers backend dequantizes. Q8_0 has llama.cpp's batched
and AMX kernels on x86, so this backend is several times faster than transformers on a CPU
and gains from decoding sessions together. What stays the same as the transformers
backend: the weights, the prompt's token ids (the same tokenizer, ``chat_tokenizer``), the
decode loop and the verifiable sampler (``decoding``), and the final-norm hidden state of
every position, which llama.cpp hands out as its token embeddings when pooling is off
(``result_norm``, the row the head reads). So a transformers verifier checks a llama.cpp
host's proofs (profile ``llama_cpp``): only the arithmetic differs (llama.cpp rounds
activations to 8 bits for its Q8_0 products).

One llama.cpp context serves every concurrent generation: each is a sequence in the KV
cache, and one engine thread runs the decode steps that are waiting, together, in one
``llama_decode`` batch. A generation paused for its receipt keeps its cache, but not its
sequence: when all are taken, the least recently fed one's cache is moved out to memory
and back when it is fed again (``_Engine``).

The GGUF's own Q4_1 is not computed: llama.cpp has no matrix-matrix kernel for it on x86
(a decode of 8 sequences costs about 8 of one), and its AMX path (the extra CPU buffer
types) produced wrong logits for Q4_1 on this project's machines (a mean prompt
log-likelihood of -6.5 against -3.9). For Q8_0 the AMX path is right (-3.89 against -3.87
without it), so it is on.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inferledger.inference.base import (
    BackendError,
    BackendUnavailable,
    Event,
    GenerationParams,
)
from inferledger.inference.chat_tokenizer import ChatModel, ChatTokenizer
from inferledger.inference.computed_weights import ensure_computed
from inferledger.inference.decoding import decode
from inferledger.inference.model_cache import ensure_converted, locate_weights
from inferledger.inference.sampling import SAMPLER
from inferledger.paths import home as inferledger_home

INSTALL_HINT = "bash scripts/llama-wheel.sh (builds llama-cpp-python once and caches the wheel)"
DTYPE = "q8_0"
"""What a llama.cpp bundle names as its dtype: the computed copy's Q8_0 weights, multiplied
in llama.cpp's 8-bit arithmetic."""


def _import_llama() -> Any:
    try:
        import llama_cpp
    except ImportError as error:
        raise BackendUnavailable(
            f"llama_cpp backend needs llama-cpp-python ({error}); install the extra with "
            f"`pip install 'inferledger[llama]'` or `{INSTALL_HINT}`"
        ) from error
    return llama_cpp


@dataclass(eq=False)
class _Stream:
    """One generation's place in llama.cpp: a physical sequence of the context while it is
    resident, else its KV cache saved aside (``saved``) until it is fed again."""

    seq: int | None = None
    saved: Any = None
    used: int = 0  # the engine's decode count when it was last fed


@dataclass(eq=False)
class _Feed:
    """One caller's tokens for the next decode, and where its answer goes."""

    stream: _Stream
    tokens: list[int]
    start: int
    rows: bool
    done: threading.Event = field(default_factory=threading.Event)
    hidden: np.ndarray | None = None
    logits: np.ndarray | None = None
    error: BaseException | None = None


class _Engine:
    """The one thread that calls llama.cpp. It takes every feed waiting (at most one per
    physical sequence and ``n_batch`` tokens in all), decodes them as one batch, then wakes
    their callers.

    Generations outnumber the context's sequences whenever replies wait for receipts: a
    waiting generation still holds its KV cache. So a generation holds a sequence only
    while it is resident; a feed that finds none free moves the least recently fed one's
    cache out to memory (``llama_state_seq_get_data``) and takes its place, and that one is
    moved back in when it is next fed. Nobody waits for a sequence, so a client that never
    signs cannot keep anyone else from being served.

    Between two decodes every caller picks its next token, one at a time under the GIL. A
    decode taken as soon as the first of them is back would run it nearly alone (on a CPU,
    one sequence costs 40% of what eight do), and the batch would stay split. So the next
    decode waits for every stream of the last one to feed again (``_gather``), for at most
    half the last decode's time; a stream that misses that (its reply paused for a receipt)
    is not waited for again until it feeds. Batching never changes a token, only when it
    is computed."""

    GRACE = 0.5
    """How long the next decode waits for the last one's streams, in units of its time."""

    def __init__(
        self, lib: Any, ctx: Any, sequences: int, n_batch: int, n_embd: int, n_vocab: int
    ) -> None:
        self._lib, self._ctx = lib, ctx
        self._memory = lib.llama_get_memory(ctx)
        self.n_batch, self._n_embd, self._n_vocab = n_batch, n_embd, n_vocab
        self._batch = lib.llama_batch_init(n_batch, 0, 1)
        self._free = list(range(sequences))
        self._resident: list[_Stream] = []
        self._waiting: list[_Feed] = []
        self._dropped: list[_Stream] = []
        self._cond = threading.Condition()
        self._closed = False
        self._expected: set[int] = set()  # ids of the streams the next decode waits for
        self._last_decode = 0.0  # seconds
        self.decodes = 0
        """How many llama_decode calls ran (tests and benches read it)."""
        self.batched_feeds = 0
        """How many feeds shared a decode with another one."""
        self.evictions = 0
        """How many times a waiting generation's cache was moved out for another."""
        self._thread = threading.Thread(target=self._run, name="llama-cpp-engine", daemon=True)
        self._thread.start()

    def feed(self, stream: _Stream, tokens: list[int], start: int, rows: bool) -> _Feed:
        """Run ``tokens`` at positions ``start..`` of ``stream``; blocks until done."""
        if not 0 < len(tokens) <= self.n_batch:
            raise ValueError(f"a feed holds 1..{self.n_batch} tokens, got {len(tokens)}")
        item = _Feed(stream, tokens, start, rows)
        with self._cond:
            if self._closed:
                raise BackendError("the llama.cpp backend is closed")
            self._waiting.append(item)
            self._cond.notify()
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item

    def drop(self, stream: _Stream) -> None:
        """Forget ``stream``'s cache (its generation ended); done by the engine thread."""
        with self._cond:
            self._dropped.append(stream)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        self._lib.llama_batch_free(self._batch)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._dropped or self._closed):
                    self._cond.wait()
                self._gather()
                if self._closed:
                    for item in self._waiting:
                        item.error = BackendError("the llama.cpp backend is closed")
                        item.done.set()
                    return
                dropped, self._dropped = self._dropped, []
                batch = self._take_batch()
                self._expected = {id(item.stream) for item in batch}
            for stream in dropped:
                self._forget(stream)
            if not batch:
                continue
            started = time.monotonic()
            try:
                self._place(batch)
                self._decode(batch)
            except BaseException as error:  # handed to every caller of this batch
                for item in batch:
                    item.error = error
            self._last_decode = time.monotonic() - started
            for item in batch:
                item.done.set()

    def _gather(self) -> None:
        """Hold the next decode (under the lock) until the last one's streams have fed
        again, ended, or had ``GRACE`` of the last decode's time to do so."""
        deadline = time.monotonic() + self.GRACE * self._last_decode
        while not self._closed:
            self._expected -= {id(stream) for stream in self._dropped}
            if self._expected <= {id(item.stream) for item in self._waiting}:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _take_batch(self) -> list[_Feed]:
        """The waiting feeds that fit one decode, oldest first."""
        batch: list[_Feed] = []
        room, seats = self.n_batch, len(self._free) + len(self._resident)
        for item in list(self._waiting):
            if len(item.tokens) <= room and len(batch) < seats:
                batch.append(item)
                room -= len(item.tokens)
                self._waiting.remove(item)
        return batch

    def _place(self, feeds: list[_Feed]) -> None:
        """Make every stream of ``feeds`` resident, moving out the least recently fed."""
        lib = self._lib
        needed = {id(item.stream) for item in feeds}
        for item in feeds:
            stream = item.stream
            if stream.seq is not None:
                continue
            if not self._free:
                idle = [s for s in self._resident if id(s) not in needed]
                victim = min(idle, key=lambda s: s.used)
                assert victim.seq is not None
                size = lib.llama_state_seq_get_size(self._ctx, victim.seq)
                victim.saved = (ctypes.c_uint8 * size)()
                lib.llama_state_seq_get_data(self._ctx, victim.saved, size, victim.seq)
                self._evict(victim)
                self.evictions += 1
            stream.seq = self._free.pop()
            self._resident.append(stream)
            if stream.saved is not None:
                saved, stream.saved = stream.saved, None
                if not lib.llama_state_seq_set_data(self._ctx, saved, len(saved), stream.seq):
                    raise BackendError("llama.cpp could not restore a generation's cache")

    def _evict(self, stream: _Stream) -> None:
        assert stream.seq is not None
        self._lib.llama_memory_seq_rm(self._memory, stream.seq, -1, -1)
        self._resident.remove(stream)
        self._free.append(stream.seq)
        stream.seq = None

    def _forget(self, stream: _Stream) -> None:
        stream.saved = None
        if stream.seq is not None:
            self._evict(stream)

    def _decode(self, feeds: list[_Feed]) -> None:
        lib, batch = self._lib, self._batch
        # In sequence order: llama.cpp splits a batch whose sequences come out of order
        # (separate KV streams) into a decode per sequence, 8 sequences costing 8 steps.
        feeds = sorted(feeds, key=lambda item: item.stream.seq or 0)
        want_rows = any(item.rows for item in feeds)
        # Embeddings on makes llama.cpp output every position; off, only the flagged ones.
        lib.llama_set_embeddings(self._ctx, want_rows)
        n = 0
        last: list[int] = []
        for item in feeds:
            item.stream.used = self.decodes
            for offset, token in enumerate(item.tokens):
                batch.token[n] = token
                batch.pos[n] = item.start + offset
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = item.stream.seq
                batch.logits[n] = 1 if want_rows or offset == len(item.tokens) - 1 else 0
                n += 1
            last.append(n - 1)
        batch.n_tokens = n
        status = lib.llama_decode(self._ctx, batch)
        if status != 0:
            raise BackendError(f"llama_decode failed ({status}): the batch was refused")
        self.decodes += 1
        if len(feeds) > 1:
            self.batched_feeds += len(feeds)
        # Two calls for all of the batch's outputs, not two per feed: each ctypes call gives
        # the GIL away and has to take it back from the callers picking their tokens.
        outputs = n if want_rows else len(feeds)
        logits = self._matrix(lib.llama_get_logits, outputs, self._n_vocab)
        rows = self._matrix(lib.llama_get_embeddings, outputs, self._n_embd) if want_rows else None
        first = 0
        for index, (item, end) in enumerate(zip(feeds, last, strict=True)):
            if item.rows:
                assert rows is not None
                item.hidden = rows[first : end + 1].copy()
            item.logits = logits[end if want_rows else index].copy()
            first = end + 1

    def _matrix(self, getter: Callable[[Any], Any], count: int, size: int) -> np.ndarray:
        pointer = getter(self._ctx)
        if not pointer:
            raise BackendError("llama.cpp kept no outputs for the batch")
        return np.ctypeslib.as_array(pointer, shape=(count, size))


class LlamaCppBackend(ChatModel):
    """A GGUF run by llama.cpp; up to ``sequences`` generations share each decode step."""

    supports_hidden_states = True
    engine = "llama_cpp"
    dtype = DTYPE
    sampler = SAMPLER

    def __init__(
        self,
        gguf_path: str | Path | None = None,
        *,
        home: str | Path | None = None,
        name: str | None = None,
        num_threads: int | None = None,
        sequences: int = 4,
        context_length: int | None = None,
        batch_tokens: int = 512,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        """``sequences``: generations decoded together, each with a KV cache of
        ``context_length`` positions (default: the model's own); more generations than
        that take turns, their caches moved out and back as they are fed."""
        if sequences < 1:
            raise ValueError("sequences must be at least 1")
        lib = _import_llama()
        report = progress or (lambda stage: None)
        report("checking the weights (sha256)")
        self.weights_path, self.weights_sha256, self.name = locate_weights(gguf_path, name)
        cache_home = Path(home) if home else inferledger_home()
        # The tokenizer every backend shares lives next to the converted weights.
        self._chat = ChatTokenizer(
            ensure_converted(self.weights_path, self.weights_sha256, cache_home)
        )
        self.computed_path = ensure_computed(self.weights_path, self.weights_sha256, cache_home)
        report("loading the model (llama.cpp)")
        self._lib = lib
        _quiet(lib)
        lib.llama_backend_init()
        model_params = lib.llama_model_default_params()
        model_params.use_extra_bufts = True  # AMX and repacked kernels: right for Q8_0
        self._model = lib.llama_model_load_from_file(str(self.computed_path).encode(), model_params)
        if not self._model:
            raise BackendUnavailable(f"llama.cpp cannot load {self.computed_path}")
        trained = lib.llama_model_n_ctx_train(self._model)
        self.context_length: int = min(context_length or trained, trained)
        self.hidden_size: int = lib.llama_model_n_embd(self._model)
        n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self._model))
        self.threads = num_threads or 1
        params = lib.llama_context_default_params()
        params.n_ctx = self.context_length * sequences
        params.n_seq_max = sequences
        params.kv_unified = False  # each sequence its own cache stream of context_length
        params.n_batch = params.n_ubatch = batch_tokens
        params.n_threads = params.n_threads_batch = self.threads
        params.embeddings = True
        params.pooling_type = lib.LLAMA_POOLING_TYPE_NONE
        self._ctx = lib.llama_init_from_model(self._model, params)
        if not self._ctx:
            lib.llama_model_free(self._model)
            raise BackendUnavailable("llama.cpp cannot create a context (out of memory?)")
        self._engine = _Engine(lib, self._ctx, sequences, batch_tokens, self.hidden_size, n_vocab)
        self._eos_ids = self._chat.eos_ids
        self._head: np.ndarray | None = None
        self._head_lock = threading.Lock()

    @property
    def engine_stats(self) -> tuple[int, int, int]:
        """(decode calls, feeds that shared a decode, caches moved out for another)."""
        engine = self._engine
        return engine.decodes, engine.batched_feeds, engine.evictions

    def _generate(
        self, prompt_ids: list[int], params: GenerationParams, limit: int, capture: bool
    ) -> Generator[Event, None, None]:
        stream = _Stream()
        try:
            step = self._stepper(stream, capture)
            yield from decode(
                prompt_ids,
                params,
                limit,
                capture=capture,
                step=step,
                eos_ids=self._eos_ids,
                detokenize=self.decode,
            )
        finally:
            self._engine.drop(stream)

    def prefill_hidden_states(self, token_ids: Sequence[int]) -> np.ndarray:
        if not token_ids:
            raise ValueError("token_ids must not be empty")
        if len(token_ids) > self.context_length:
            raise ValueError(f"{len(token_ids)} tokens exceed the context ({self.context_length})")
        stream = _Stream()
        try:
            rows, _ = self._stepper(stream, True)(list(token_ids))
            return rows
        finally:
            self._engine.drop(stream)

    def logits(self, hidden_states: np.ndarray) -> np.ndarray:
        """Next-token logits after each final-norm row: the computed copy's (tied) output matrix,
        dequantized once, applied in float32 (a verifier's check of sampled tokens)."""
        head = self._output_matrix()
        rows = np.ascontiguousarray(hidden_states, dtype=np.float32)
        result: np.ndarray = rows @ head.T
        return result

    def describe(self) -> dict[str, object]:
        """The machine and code a verdict came from (see the transformers backend)."""
        import platform

        lib = self._lib
        return {
            "engine": self.engine,
            "weights_sha256": self.weights_sha256,
            "dtype": self.dtype,
            "device": "cpu",
            "threads": self.threads,
            "llama_cpp_python": lib.__version__,
            "system": lib.llama_print_system_info().decode(errors="replace").strip(),
            "numpy": np.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "sampler": self.sampler,
        }

    def close(self) -> None:
        """Stop the engine thread and free the context and the weights."""
        if self._ctx:
            self._engine.close()
            self._lib.llama_free(self._ctx)
            self._lib.llama_model_free(self._model)
            self._ctx = None

    def _stepper(
        self, stream: _Stream, capture: bool
    ) -> Callable[[list[int]], tuple[np.ndarray, np.ndarray]]:
        """A decode step for ``stream``: long inputs go in chunks of the batch size."""
        position = 0

        def step(token_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
            nonlocal position
            size = self._engine.n_batch
            parts: list[np.ndarray] = []
            logits: np.ndarray | None = None
            for start in range(0, len(token_ids), size):
                chunk = token_ids[start : start + size]
                done = self._engine.feed(stream, chunk, position, capture)
                position += len(chunk)
                if done.hidden is not None:
                    parts.append(done.hidden)
                logits = done.logits
            assert logits is not None
            rows = np.concatenate(parts) if parts else np.empty((0, self.hidden_size), np.float32)
            return rows, logits

        return step

    def _output_matrix(self) -> np.ndarray:
        with self._head_lock:
            if self._head is None:
                self._head = _read_output_matrix(self.computed_path)
            return self._head


def _read_output_matrix(path: Path) -> np.ndarray:
    """``output.weight`` of a GGUF, or the token embeddings when the head is tied."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    tensors = {tensor.name: tensor for tensor in GGUFReader(str(path)).tensors}
    tensor = tensors.get("output.weight") or tensors["token_embd.weight"]
    shape = [int(size) for size in reversed(tensor.shape)]
    matrix: np.ndarray = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
    return matrix.astype(np.float32)


_LOG_SINK: Any = None


def _quiet(lib: Any) -> None:
    """Send llama.cpp's chatter (hundreds of lines per load) nowhere; errors still raise."""
    global _LOG_SINK
    if _LOG_SINK is None:
        _LOG_SINK = lib.llama_log_callback(lambda level, text, data: None)
        lib.llama_log_set(_LOG_SINK, ctypes.c_void_p())
