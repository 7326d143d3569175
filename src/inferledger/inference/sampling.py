"""The verifiable sampler: each token a pure function of the logits, the sampling
parameters, the tokens before it and the user's seed (docs/proofs.md, "Sampling").

Gumbel-max: ``argmax(z_i + g_i)`` over the tempered, penalised, nucleus-masked logits
``z``, where ``g_i = -ln(-ln(u_i))`` and the uniforms ``u`` of position ``p`` come from a
ChaCha20 keystream keyed by ``keccak256("inferledger/sampler/v1" || seed || p)``. That draws
exactly from softmax(z), yet a verifier holding the seed and its own logits recomputes the
choice at every position: text from another model, or written by hand and "proved" by a
prefill of the right one, picks other tokens. Temperature 0 is greedy (no noise). Ties go
to the lowest index, everywhere. The seed is the user's (``prompt.seed``), so the host
cannot grind it; without one, it is 0.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from eth_utils.crypto import keccak

from inferledger.inference.base import GenerationParams

SAMPLER = "gumbel-chacha20/v1"
"""The sampler's name in proof bundles: a verifier checks only samplers it knows."""
DEFAULT_SEED = 0
_LABEL = b"inferledger/sampler/v1"
_FIRST_CANDIDATES = 64


def position_key(seed: int, position: int) -> bytes:
    """The 32-byte ChaCha20 key of reply position ``position`` (0-based) under ``seed``."""
    return keccak(_LABEL + seed.to_bytes(8, "big") + position.to_bytes(8, "big"))


def gumbel_noise(seed: int, position: int, vocab: int, ids: np.ndarray | None = None) -> np.ndarray:
    """Gumbel(0, 1) draws for token ids ``ids`` (default: all ``vocab``): keystream word
    ``i`` (little-endian uint64) gives ``u_i = ((w >> 11) + 0.5) / 2**53``, strictly
    inside (0, 1). Only the ids asked for are transformed (the nucleus, usually few)."""
    stream = Cipher(algorithms.ChaCha20(position_key(seed, position), bytes(16)), mode=None)
    words = np.frombuffer(stream.encryptor().update(bytes(8 * vocab)), dtype="<u8")
    if ids is not None:
        words = words[ids]
    uniform = ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    noise: np.ndarray = -np.log(-np.log(uniform))
    return noise


def penalised(logits: np.ndarray, context: Iterable[int], repetition_penalty: float) -> np.ndarray:
    """The logits as float64, every token id already in ``context`` (prompt and reply so
    far) made less likely: a positive logit divided by the penalty, a negative multiplied."""
    z = np.asarray(logits, dtype=np.float64).copy()
    if repetition_penalty != 1.0:
        seen = np.fromiter(set(context), dtype=np.int64)
        seen = seen[(seen >= 0) & (seen < len(z))]
        z[seen] = np.where(z[seen] > 0, z[seen] / repetition_penalty, z[seen] * repetition_penalty)
    return z


def nucleus(tempered: np.ndarray, top_p: float) -> np.ndarray:
    """Which ids survive top-p: the most likely ones, in order (ties by lowest id), until
    the mass before the next reaches ``top_p``; the top one always does."""
    if top_p >= 1.0:
        return np.ones(len(tempered), dtype=bool)
    probs = np.exp(tempered - tempered.max())
    probs /= probs.sum()
    # Sorting only the likeliest ids (every id at least as likely as the m-th, ties all in)
    # gives the same set once they hold top_p between them: every other id has at least
    # their mass before it. m grows until they do (at worst, the whole vocabulary).
    size = len(probs)
    m = min(_FIRST_CANDIDATES, size)
    while True:
        floor = np.partition(probs, size - m)[size - m]
        candidates = np.flatnonzero(probs >= floor)
        if m == size or probs[candidates].sum() >= top_p:
            break
        m = min(size, m * 8)
    order = candidates[np.argsort(-probs[candidates], kind="stable")]
    mass_before = np.cumsum(probs[order]) - probs[order]
    keep = np.zeros(len(tempered), dtype=bool)
    keep[order[mass_before < top_p]] = True
    return keep


def scores(
    logits: np.ndarray, params: GenerationParams, position: int, context: Iterable[int]
) -> np.ndarray:
    """What the sampler maximises at reply ``position``: the penalised logits when greedy,
    else the tempered ones (-inf outside the nucleus) plus the position's Gumbel noise."""
    z = penalised(logits, context, params.repetition_penalty)
    if params.temperature == 0:
        return z
    z /= params.temperature
    seed = DEFAULT_SEED if params.seed is None else params.seed
    if params.top_p >= 1.0:
        result: np.ndarray = z + gumbel_noise(seed, position, len(z))
        return result
    kept = np.flatnonzero(nucleus(z, params.top_p))
    masked = np.full(len(z), -np.inf)
    masked[kept] = z[kept] + gumbel_noise(seed, position, len(z), kept)
    return masked


def sample_next(
    logits: np.ndarray, params: GenerationParams, position: int, context: Iterable[int]
) -> int:
    """The token at reply ``position`` (0-based) after ``context`` (prompt + reply so far)."""
    return int(np.argmax(scores(logits, params, position, context)))
