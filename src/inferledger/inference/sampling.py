"""Pick the next token from logits: greedy, temperature and nucleus (top-p) sampling.

Sampling draws from a per-request ``torch.Generator`` rather than the global RNG, so a seed
reproduces the same tokens even when other requests run in between.
"""

from __future__ import annotations

import torch

from inferledger.inference.base import GenerationParams


def make_generator(seed: int | None) -> torch.Generator:
    """A private RNG: seeded when asked, otherwise seeded from the OS."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample_next(logits: torch.Tensor, params: GenerationParams, generator: torch.Generator) -> int:
    """Choose one token id from a 1-D logits vector."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        probs = _nucleus(probs, params.top_p)
    return int(torch.multinomial(probs, num_samples=1, generator=generator))


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p``."""
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs[mass_before >= top_p] = 0.0  # the top token always survives (mass_before == 0)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum()
