"""Tokens per second of each local backend on SmolLM2: one stream, then 1, 4 and 8 at once.

Each concurrent generation runs in its own thread, as the node runs them; llama.cpp
decodes them together (one batch per step), transformers as it is configured. Every
generation is greedy with hidden-state capture on (what a proving node asks for), over
its own prompt, for at most a fixed number of tokens; a reply that ends early counts
the tokens it made (the table shows them).

Targets (issue 14): llama.cpp >= 3x transformers single-stream; 8 sessions >= 3x one
session in aggregate. Figures come from this one run; nothing is asserted.

Run: ``python bench/backends.py [--full] [--threads 1]``. Quick mode (CI): 32 tokens per
generation; ``--full``: 128.
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from inferledger.inference import GenerationParams, Token, load_backend

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
    parser.add_argument("--full", action="store_true", help="128 tokens per generation")
    parser.add_argument("--threads", type=int, default=1, help="compute threads per backend")
    args = parser.parse_args()
    tokens = 128 if args.full else 32
    console = Console()
    backends = {
        "transformers": load_backend("transformers", num_threads=args.threads),
        "llama_cpp": load_backend(
            "llama_cpp", num_threads=args.threads, sequences=max(CONCURRENCY), context_length=2048
        ),
    }
    rates: dict[tuple[str, int], float] = {}
    table = Table(title=f"SmolLM2 tokens/s ({tokens} tokens per generation, greedy, capture on)")
    table.add_column("backend")
    for sessions in CONCURRENCY:
        table.add_column(f"{sessions} at once", justify="right")
    table.add_column("8 vs 1", justify="right")
    for name, backend in backends.items():
        generate(backend, PROMPTS[0], 4)  # warm-up: first-call allocations
        row = []
        for sessions in CONCURRENCY:
            rate, made = aggregate(backend, sessions, tokens)
            rates[name, sessions] = rate
            row.append(f"{rate:.1f} ({made} tok)")
        table.add_row(name, *row, f"{rates[name, 8] / rates[name, 1]:.2f}x")
    console.print(table)
    single = rates["llama_cpp", 1] / rates["transformers", 1]
    console.print(f"llama.cpp / transformers, one stream: {single:.2f}x (target >= 3)")
    for name in backends:
        ratio = rates[name, 8] / rates[name, 1]
        console.print(f"{name}: 8 sessions / 1 session in aggregate: {ratio:.2f}x (target >= 3)")
    decodes, shared, moved = backends["llama_cpp"].engine_stats  # type: ignore[attr-defined]
    console.print(
        f"llama.cpp decode calls: {decodes}, feeds that shared a decode: {shared}, "
        f"caches moved out for another: {moved}"
    )
    for backend in backends.values():
        backend.close()


if __name__ == "__main__":
    main()
