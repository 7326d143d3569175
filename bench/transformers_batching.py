"""Aggregate tokens/s of the transformers backend with 1, 4 and 8 concurrent generations.

Each generation runs in its own thread, as the node runs them: greedy, hidden-state capture
on (what a proving node asks for), over its own prompt, ``--tokens`` tokens at most. Each
concurrency is measured ``--rounds`` times, the concurrencies taking turns so a machine
that gets busier or quieter favours none of them; the table shows the median round.

The script uses only the backend's public API, so the same file measures another checkout
(``PYTHONPATH=/path/to/other/src``): that is how the figures before batching were taken.
The engine's counters (passes, batched steps) are shown when the backend has them.
``--max-batch 1 8`` loads one backend per value and interleaves their rounds in this one
process: ``max_batch=1`` steps every generation alone through the model's own forward, the
same arithmetic and the same one-pass-at-a-time interleaving as before batching.

Target (issue 14): 8 sessions >= 3x one session in aggregate. Nothing is asserted.

Measured (2 busy cores, torch at 1 thread, 64 tokens, ``--rounds 3 --max-batch 1 8``,
median tok/s): max_batch=1 7.1 / 7.3 / 6.1 for 1 / 4 / 8 sessions; max_batch=8 5.6 / 16.6 /
19.7, so 8 sessions are 3.5x one session of the batched engine and 2.8x one session of the
unbatched path, and a lone session pays ~20% for the batch-invariant product.

Run: ``python bench/transformers_batching.py [--tokens 64] [--rounds 3] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Any

from inferledger.inference import GenerationParams, Token
from inferledger.inference.transformers_backend import TransformersBackend

PROMPTS = [
    "Tell me a long story about a lighthouse keeper.",
    "Explain how a steam engine works, step by step.",
    "Write a letter to a friend about a trip to the mountains.",
    "Describe the history of the printing press.",
    "What should I pack for a week of hiking? Explain each item.",
    "Write a detailed recipe for bread and explain each step.",
    "Describe a day in the life of a medieval blacksmith.",
    "Explain why the seasons change, for a ten-year-old.",
]
CONCURRENCY = (1, 4, 8)


def generate(backend: Any, prompt: str, tokens: int) -> int:
    params = GenerationParams(max_tokens=tokens, temperature=0.0)
    messages = [{"role": "user", "content": prompt}]
    events = backend.generate(messages, params, capture_hidden_states=True)
    return sum(1 for event in events if isinstance(event, Token))


def aggregate(backend: Any, sessions: int, tokens: int) -> tuple[float, int]:
    """Tokens per second of ``sessions`` generations run at once, and the tokens made."""
    counts = [0] * sessions
    barrier = threading.Barrier(sessions + 1)

    def one(index: int) -> None:
        barrier.wait()
        counts[index] = generate(backend, PROMPTS[index % len(PROMPTS)], tokens)

    workers = [threading.Thread(target=one, args=(i,)) for i in range(sessions)]
    for worker in workers:
        worker.start()
    barrier.wait()
    start = time.perf_counter()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - start
    return sum(counts) / seconds, sum(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="tokens per generation")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per concurrency")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--label", default="", help="a name for this run's table")
    parser.add_argument(
        "--max-batch", type=int, nargs="*", default=[], help="one backend per value (see above)"
    )
    args = parser.parse_args()
    options: list[dict[str, int]] = [{"max_batch": n} for n in args.max_batch] or [{}]
    backends = [TransformersBackend(num_threads=args.threads, **o) for o in options]
    runs = [Run(backend) for backend in backends]
    for backend in backends:
        generate(backend, PROMPTS[0], 4)  # warm up (and let the engine probe its batch sizes)
    for _ in range(args.rounds):
        for sessions in CONCURRENCY:
            for run in runs:
                run.measure(sessions, args.tokens)
    for option, run in zip(options, runs, strict=True):
        name = args.label or "transformers"
        if option:
            name += f" max_batch={option['max_batch']}"
        run.show(f"{name}: {args.tokens} tokens, {args.threads} thread(s)")
    for backend in backends:
        backend.close()


class Run:
    """One backend's figures over the rounds."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.figures: dict[int, list[float]] = {n: [] for n in CONCURRENCY}
        self.made: dict[int, int] = {}
        self.stats: dict[int, tuple[int, int]] = {}

    def measure(self, sessions: int, tokens: int) -> None:
        before = getattr(self.backend, "engine_stats", (0, 0))
        rate, count = aggregate(self.backend, sessions, tokens)
        after = getattr(self.backend, "engine_stats", (0, 0))
        self.figures[sessions].append(rate)
        self.made[sessions] = count
        self.stats[sessions] = (after[0] - before[0], after[1] - before[1])

    def show(self, title: str) -> None:
        base = statistics.median(self.figures[1])
        print(title)
        print(
            "sessions  tokens  tok/s (median)  all rounds          x one session  passes  batched"
        )
        for sessions in CONCURRENCY:
            rate = statistics.median(self.figures[sessions])
            rounds = " ".join(f"{r:5.1f}" for r in self.figures[sessions])
            passes, batched = self.stats[sessions]
            print(
                f"{sessions:8d}  {self.made[sessions]:6d}  {rate:14.1f}  {rounds:18s}  "
                f"{rate / base:13.2f}  {passes:6d}  {batched:7d}"
            )


if __name__ == "__main__":
    main()
