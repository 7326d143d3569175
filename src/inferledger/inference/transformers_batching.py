"""Continuous batching for the transformers backend: concurrent generations share decode steps.

One engine thread runs every forward pass. Prefills (a generation's first, multi-token step)
run alone, through the model's own forward; the single-token decode steps of all the
generations waiting are run as one batched pass by :class:`BatchDecoder`, which walks the
decoder layers itself: the matrix products (projections, MLP, head) take all sequences' rows
at once, while attention runs per sequence over that sequence's own ``DynamicCache``, so no
padding or mask ever enters a sequence's numbers.

Identical alone or batched: a sequence's rows and logits must not depend on who else is in
the batch. Attention is per sequence, norms and activations work row by row, and the products
go through ``rows @ weight.T`` with the transposed weights kept contiguous, which this
project's BLAS (MKL) computes row by row identically for every batch of 2 or more rows (a
single row takes a matrix-vector kernel that rounds differently, so a lone row is run
duplicated, which makes a lone generation's step about 30% slower than the matrix-vector
product on this machine; ``max_batch=1`` keeps the model's own forward for every step). Batch
invariance is a property of the BLAS, not a law: :func:`invariant_batch` probes it once per
weight shape when the engine starts and the engine never batches beyond what passed (at
worst, one sequence per pass, through the model's own forward).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from inferledger.inference.base import BackendError

GATHER_SECONDS = 0.005
"""How long a decode step waits for the sequences of the previous batch that have not sent
their next token yet (they are sampling it): long enough to keep a batch together, short
enough that a generation whose consumer paused costs the others little."""

IDLE_SECONDS = 2.0
"""How long the engine thread outlives its last step."""


class BatchDecoder:
    """Single-token decode steps of several sequences in one pass over a Llama-family model.

    The transposed weights are copies, refreshed whenever a weight changes (in place, as the
    proof tests' forgeries do, or replaced), so a step always computes the live model.
    """

    def __init__(self, model: Any) -> None:
        """``model``: a transformers ``LlamaForCausalLM`` (or one of its family)."""
        self._model = model
        self._transposed: dict[torch.nn.Module, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def supported(self) -> bool:
        """Whether the model is one this decoder knows how to step (plain Llama layers)."""
        inner = self._model.model
        return all(isinstance(layer, LlamaDecoderLayer) for layer in inner.layers)

    def linears(self) -> list[torch.nn.Linear]:
        """Every product a decode step takes, head last."""
        found: list[torch.nn.Linear] = []
        for layer in self._model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            found += [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj]
            found += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        found.append(self._model.lm_head)
        return found

    def transposed(self, linear: torch.nn.Linear) -> torch.Tensor:
        """``linear.weight.T`` as a contiguous copy, current with the weight."""
        weight = linear.weight
        known = self._transposed.get(linear)
        if known is None or known[0] is not weight or known[1] != weight._version:
            copy = weight.detach().T.contiguous()
            known = (weight, weight._version, copy)
            self._transposed[linear] = known
        return known[2]

    def product(self, rows: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
        """``linear(rows)`` for ``[n, in]`` rows, each row computed the same way for any n."""
        weight = self.transposed(linear)
        # One row alone would take a matrix-vector kernel: run it twice, keep the first.
        out = (torch.cat([rows, rows]) @ weight)[:1] if rows.shape[0] == 1 else rows @ weight
        if linear.bias is not None:
            out = out + linear.bias
        return out

    def step(
        self, caches: list[DynamicCache], tokens: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed ``tokens[i]`` after the positions in ``caches[i]`` (each appended to): the
        final-norm rows ``[n, hidden]`` and the next-token logits ``[n, vocab]``."""
        inner = self._model.model
        config = inner.config
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(
            config._attn_implementation, eager_attention_forward
        )
        n = len(tokens)
        with torch.inference_mode():
            x = inner.embed_tokens(torch.tensor(tokens, dtype=torch.long))
            positions = torch.tensor([[cache.get_seq_length()] for cache in caches])
            cos, sin = inner.rotary_emb(x, positions)  # [n, 1, head_dim]
            for layer in inner.layers:
                attention = layer.self_attn
                head_dim = attention.head_dim
                h = layer.input_layernorm(x)
                q = self.product(h, attention.q_proj).view(n, 1, -1, head_dim).transpose(1, 2)
                k = self.product(h, attention.k_proj).view(n, 1, -1, head_dim).transpose(1, 2)
                v = self.product(h, attention.v_proj).view(n, 1, -1, head_dim).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                mixed = []
                for i, cache in enumerate(caches):
                    keys, values = cache.update(k[i : i + 1], v[i : i + 1], attention.layer_idx)
                    out, _ = attend(
                        attention,
                        q[i : i + 1],
                        keys,
                        values,
                        None,
                        dropout=0.0,
                        scaling=attention.scaling,
                    )
                    mixed.append(out.reshape(1, -1))
                x = x + self.product(torch.cat(mixed), attention.o_proj)
                h = layer.post_attention_layernorm(x)
                mlp = layer.mlp
                gated = mlp.act_fn(self.product(h, mlp.gate_proj)) * self.product(h, mlp.up_proj)
                x = x + self.product(gated, mlp.down_proj)
            x = inner.norm(x)
            logits = self.product(x, self._model.lm_head)
        return x, logits


def invariant_batch(decoder: BatchDecoder, most: int) -> int:
    """The largest batch (``1..most``) for which every product gives each row exactly what
    it gives that row alone, for every weight shape of the model."""
    generator = torch.Generator().manual_seed(0)
    shapes: dict[tuple[int, ...], torch.nn.Linear] = {}
    for linear in decoder.linears():
        shapes.setdefault(tuple(linear.weight.shape), linear)
    best = most
    with torch.inference_mode():
        for linear in shapes.values():
            weight = linear.weight
            rows = torch.randn(most, weight.shape[1], generator=generator).to(weight.dtype)
            alone = torch.cat([decoder.product(rows[i : i + 1], linear) for i in range(most)])
            for size in range(2, best + 1):
                if not torch.equal(decoder.product(rows[:size], linear), alone[:size]):
                    best = size - 1
                    break
    return best


@dataclass(eq=False)
class Decoding:
    """One generation's state in the engine: its KV cache, empty until its first step."""

    cache: DynamicCache


@dataclass(eq=False)
class _Work:
    """One step waiting for the engine, and where its answer goes."""

    sequence: Decoding | None  # None: a prefill without cache (a verifier's)
    tokens: list[int]
    done: threading.Event = field(default_factory=threading.Event)
    hidden: torch.Tensor | None = None
    logits: np.ndarray | None = None
    error: BaseException | None = None

    @property
    def decode(self) -> bool:
        return (
            self.sequence is not None
            and len(self.tokens) == 1
            and self.sequence.cache.get_seq_length() > 0
        )


@dataclass(frozen=True, slots=True)
class _Done:
    hidden: torch.Tensor
    logits: np.ndarray | None


Forward = Callable[[list[int], DynamicCache | None], torch.Tensor]
Head = Callable[[torch.Tensor], torch.Tensor]


class Engine:
    """The one thread that runs the model. Each round it takes the decode steps waiting (at
    most ``max_batch``) and runs them as one batch, then at most one other step (a prefill)
    alone through ``forward``; callers block on their own step.

    The thread starts with the first step and ends after ``idle_seconds`` without work (or
    at :meth:`stop`), so an unused backend holds no thread and can be garbage collected.
    """

    def __init__(
        self,
        decoder: BatchDecoder,
        forward: Forward,
        head: Head,
        max_batch: int,
        gather_seconds: float = GATHER_SECONDS,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        self._decoder, self._forward, self._head = decoder, forward, head
        self.max_batch = invariant_batch(decoder, max_batch) if max_batch > 1 else 1
        self._gather, self._idle = gather_seconds, idle_seconds
        self._waiting: list[_Work] = []
        self._expected: set[Decoding] = set()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.passes = 0
        """Forward passes run (prefills and decode batches; tests and benches read it)."""
        self.batched_steps = 0
        """Decode steps that shared their pass with another sequence's."""

    def run(self, sequence: Decoding, tokens: list[int]) -> tuple[torch.Tensor, np.ndarray]:
        """Feed ``tokens`` to ``sequence``; blocks until done. Returns the final-norm rows
        and the logits after the last token."""
        done = self._wait(_Work(sequence, list(tokens)))
        assert done.logits is not None
        return done.hidden, done.logits

    def prefill(self, tokens: list[int]) -> torch.Tensor:
        """The final-norm rows of one prefill over ``tokens``, without a cache (no logits)."""
        return self._wait(_Work(None, list(tokens))).hidden

    def release(self, sequence: Decoding) -> None:
        """A generation ended: no batch waits for it any more."""
        with self._cond:
            self._expected.discard(sequence)
            self._cond.notify_all()

    def stop(self) -> None:
        """End the thread now; steps still waiting fail. A later step starts a new one."""
        with self._cond:
            thread = self._thread
            if thread is None:
                return
            self._stopping = True
            self._cond.notify_all()
        if thread is not threading.current_thread():
            thread.join()

    def _wait(self, work: _Work) -> _Done:
        if not work.tokens:
            raise ValueError("a step needs at least one token")
        with self._cond:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(
                    target=self._run, name="transformers-engine", daemon=True
                )
                self._thread.start()
            self._waiting.append(work)
            self._cond.notify_all()
        work.done.wait()
        if work.error is not None:
            raise work.error
        assert work.hidden is not None
        return _Done(work.hidden, work.logits)

    def _take(self) -> tuple[list[_Work], _Work | None] | None:
        """The next round's decode batch and lone step; None when the thread should end
        (stopped, or idle too long)."""
        with self._cond:
            idle_until = time.monotonic() + self._idle
            while not self._waiting and not self._stopping:
                left = idle_until - time.monotonic()
                if left <= 0:
                    self._thread = None
                    return None
                self._cond.wait(left)
            # Hold the batch a moment for the last batch's sequences still sampling.
            deadline = time.monotonic() + self._gather
            while not self._stopping:
                arrived = {work.sequence for work in self._waiting if work.decode}
                left = deadline - time.monotonic()
                if self._expected <= arrived or len(arrived) >= self.max_batch or left <= 0:
                    break
                self._cond.wait(left)
            if self._stopping:
                for work in self._waiting:
                    work.error = BackendError("the transformers backend was closed")
                    work.done.set()
                self._waiting.clear()
                self._expected.clear()
                self._thread = None
                return None
            batch = [work for work in self._waiting if work.decode][: self.max_batch]
            alone = next((work for work in self._waiting if not work.decode), None)
            taken = {*batch, *([alone] if alone is not None else [])}
            self._waiting = [work for work in self._waiting if work not in taken]
            self._expected = {work.sequence for work in batch if work.sequence is not None}
            return batch, alone

    def _run(self) -> None:
        while (taken := self._take()) is not None:
            batch, alone = taken
            if batch:
                self._finish(batch, self._step_batch)
            if alone is not None:
                self._finish([alone], self._step_alone)

    def _finish(self, works: list[_Work], run: Callable[[list[_Work]], None]) -> None:
        try:
            run(works)
        except BaseException as error:  # handed to every caller of this pass
            for work in works:
                work.error = error
        self.passes += 1
        if len(works) > 1:
            self.batched_steps += len(works)
        for work in works:
            work.done.set()

    def _step_batch(self, works: list[_Work]) -> None:
        if self.max_batch == 1 or not self._decoder.supported():
            # Nothing to share (so no need for the batch-invariant products, slower for a
            # lone row than the model's matrix-vector one), or a model
            # the decoder cannot walk (a test's edited one): the model's own forward.
            for work in works:
                self._step_alone([work])
            return
        caches = [work.sequence.cache for work in works if work.sequence is not None]
        hidden, logits = self._decoder.step(caches, [work.tokens[0] for work in works])
        values = logits.float().numpy()
        for i, work in enumerate(works):
            work.hidden = hidden[i : i + 1]
            work.logits = values[i].copy()

    def _step_alone(self, works: list[_Work]) -> None:
        (work,) = works
        cache = work.sequence.cache if work.sequence is not None else None
        hidden = self._forward(work.tokens, cache)
        work.hidden = hidden
        if work.sequence is not None:  # a generation samples from them; a verifier does not
            work.logits = self._head(hidden[-1]).float().numpy()
