"""Serving another model for a while: the forgeries the proof tests build."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


@contextmanager
def perturbed(weights: Sequence[torch.Tensor], relative: float, seed: int) -> Iterator[None]:
    """Add ``relative`` Gaussian noise (scaled by each tensor's std) to ``weights``, seeded,
    and restore them exactly afterwards."""
    saved = [w.detach().clone() for w in weights]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in weights:
            w.add_(torch.randn(w.shape, generator=generator) * w.std() * relative)
    try:
        yield
    finally:
        with torch.no_grad():
            for w, original in zip(weights, saved, strict=True):
                w.copy_(original)
