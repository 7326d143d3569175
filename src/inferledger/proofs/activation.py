"""TOPLOC activation proofs (Ong et al., ICML 2025), byte-compatible with PyPI ``toploc`` 0.1.6.

A host commits to the final-norm hidden states it computed while generating: per chunk (the
whole prompt, then every ``decode_batch`` generated positions) it takes the ``topk`` values of
largest magnitude over the flattened ``[positions, hidden]`` block, rounded to bfloat16, and
stores the polynomial through ``(flat index, bf16 bits)`` (see :mod:`.polynomial`): 258 bytes.

A verifier runs one prefill over prompt + output, picks its own top-k per chunk, evaluates the
polynomial there and compares bf16 exponents and mantissas. Hardware and kernel differences move
values by a few mantissa steps; a different model, prompt or output moves them much further.

Proofs are byte-identical to the reference's whenever a chunk's top-k set is unique. On a tie
at the k-th magnitude we keep the lowest indices; ``torch.topk`` picks in an implementation-defined
way there (CPU and CUDA differ), so no implementation can match it in that case.

A session checkpoints every ``proof_interval`` tokens, across replies, so a node proves
segments: the part of one reply a checkpoint covers (:func:`segment_chunks` gives its chunks,
:func:`build_chunk_proofs` and :func:`verify_chunk_proofs` work over any chunk list).
:func:`build_proofs` and :func:`verify_proofs` keep the reference's layout for a whole reply.

Rows of ``hidden_states`` are positions: row ``i`` is the state after input token ``i``, so
generated token ``j`` is first covered by row ``prompt_len + j`` (its own forward step).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from inferledger.proofs.polynomial import IndexPolynomial

DECODE_BATCH = 32
"""Generated positions per decode chunk (the paper's and the reference's default)."""

TOPK = 128
"""Values committed per chunk; a proof is ``2 + 2 * TOPK`` bytes."""

PROOF_BYTES = 2 + 2 * TOPK

_EXP_MASK = 0x7F80
_MANT_MASK = 0x007F
_NO_MATCH = float(2**64)
"""Mantissa statistics when no exponent matched, as in the reference."""


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Largest per-chunk errors still accepted (a chunk passes when every check is ``<=``)."""

    exp_mismatches: int
    mant_err_mean: float
    mant_err_median: float


CROSS_BACKEND = Thresholds(exp_mismatches=90, mant_err_mean=10.0, mant_err_median=8.0)
"""Published defaults for checking a proof made on other hardware or another inference engine
(Prime Intellect's TOPLOC validation scripts, tuned on bf16 GPU runs). Lax for a small float32
model: on SmolLM2-135M it accepted most single-token edits and 1% weight noise."""

SAME_BACKEND = Thresholds(exp_mismatches=4, mant_err_mean=0.1, mant_err_median=0.0)
"""For a verifier running the same float32 model code on CPU. Honest SmolLM2-135M runs measured
exactly zero error in all ~170 chunk checks (cached decode vs. one prefill, 1 or 2 threads,
eager or SDPA attention, even a float64 verifier). The bounds leave room for a few rounding
flips (one flip adds 1/128 to the mean) yet reject bf16-rounded weights (mean 0.15-0.47)."""


@dataclass(frozen=True, slots=True)
class ChunkCheck:
    """Errors measured on one chunk, and whether they are within the thresholds."""

    exp_mismatches: int
    mant_err_mean: float
    mant_err_median: float
    ok: bool


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """Outcome of a verification. ``reason`` says why it failed (``None`` when ok)."""

    ok: bool
    chunks: tuple[ChunkCheck, ...]
    reason: str | None = None


def bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even like ``torch`` does."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    bits = values.view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    rounded = rounded.astype(np.uint16)
    rounded[np.isnan(values)] = 0x7FC0
    return rounded


def chunk_bounds(positions: int, prompt_len: int, decode_batch: int = DECODE_BATCH) -> list[range]:
    """Position ranges of the chunks: the prompt, then ``decode_batch`` generated positions."""
    if not 0 < prompt_len <= positions:
        raise ValueError(f"prompt_len must be in [1, {positions}], got {prompt_len}")
    if decode_batch < 1:
        raise ValueError("decode_batch must be at least 1")
    bounds = [range(0, prompt_len)]
    for start in range(prompt_len, positions, decode_batch):
        bounds.append(range(start, min(start + decode_batch, positions)))
    return bounds


def proof_count(positions: int, prompt_len: int, decode_batch: int = DECODE_BATCH) -> int:
    """How many proofs a generation of ``positions`` rows (prompt included) carries."""
    return 1 + math.ceil((positions - prompt_len) / decode_batch)


def top_indices(bits: np.ndarray, k: int) -> np.ndarray:
    """Flat indices of the ``k`` largest magnitudes among bf16 ``bits`` (ties: lowest index).

    For non-negative floats the bit pattern orders like the value, so the magnitude is just
    the pattern without its sign bit. NaNs rank highest, as in ``torch.topk``.
    """
    magnitude = (np.asarray(bits, dtype=np.uint16).ravel() & 0x7FFF).astype(np.int32)
    if not 0 < k <= magnitude.size:
        raise ValueError(f"topk must be in [1, {magnitude.size}], got {k}")
    kth = np.partition(magnitude, magnitude.size - k)[magnitude.size - k]
    above = np.flatnonzero(magnitude > kth)
    tied = np.flatnonzero(magnitude == kth)[: k - above.size]
    return np.sort(np.concatenate([above, tied]))


def segment_chunks(
    prompt_len: int, reply_start: int, reply_end: int, decode_batch: int = DECODE_BATCH
) -> list[range]:
    """Position ranges committed for reply tokens ``[reply_start, reply_end)`` of one reply.

    A checkpoint splits a reply wherever its token range ends, so a segment may start mid-reply.
    The prompt chunk comes only with the reply's first token. Decode chunks are ``decode_batch``
    long, but a remainder is merged into the last chunk instead of getting a 258-byte proof of
    its own: every segment of at least ``decode_batch`` tokens then costs at most
    ``PROOF_BYTES / decode_batch`` bytes per token.
    """
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be at least 1, got {prompt_len}")
    if not 0 <= reply_start < reply_end:
        raise ValueError(f"need 0 <= reply_start < reply_end, got [{reply_start}, {reply_end})")
    if decode_batch < 1:
        raise ValueError("decode_batch must be at least 1")
    chunks = [range(0, prompt_len)] if reply_start == 0 else []
    first, last = prompt_len + reply_start, prompt_len + reply_end
    starts = [first + i * decode_batch for i in range(max(1, (last - first) // decode_batch))]
    chunks.extend(map(range, starts, [*starts[1:], last]))
    return chunks


def build_proofs(
    hidden_states: np.ndarray,
    prompt_len: int,
    *,
    decode_batch: int = DECODE_BATCH,
    topk: int = TOPK,
) -> list[bytes]:
    """One ``2 + 2 * topk``-byte proof per chunk of ``hidden_states`` ([positions, hidden])."""
    bounds = chunk_bounds(np.asarray(hidden_states).shape[0], prompt_len, decode_batch)
    return build_chunk_proofs(hidden_states, 0, bounds, topk=topk)


def build_chunk_proofs(
    rows: np.ndarray, first_position: int, chunks: Sequence[range], *, topk: int = TOPK
) -> list[bytes]:
    """One proof per chunk; ``rows[i]`` is position ``first_position + i``.

    A node keeps only the rows it has not proved yet, hence the offset.
    """
    proofs = []
    for flat in _chunk_values(rows, first_position, chunks):
        indices = top_indices(flat, topk)
        proofs.append(IndexPolynomial.through(indices, flat[indices]).to_bytes())
    return proofs


def verify_proofs(
    proofs: list[bytes],
    hidden_states: np.ndarray,
    prompt_len: int,
    *,
    thresholds: Thresholds = CROSS_BACKEND,
    decode_batch: int = DECODE_BATCH,
    topk: int = TOPK,
) -> VerifyResult:
    """Check ``proofs`` against a verifier's own hidden states for the same prompt + output."""
    bounds = chunk_bounds(np.asarray(hidden_states).shape[0], prompt_len, decode_batch)
    return verify_chunk_proofs(proofs, hidden_states, bounds, thresholds=thresholds, topk=topk)


def verify_chunk_proofs(
    proofs: Sequence[bytes],
    prefill_states: np.ndarray,
    chunks: Sequence[range],
    *,
    thresholds: Thresholds = CROSS_BACKEND,
    topk: int = TOPK,
) -> VerifyResult:
    """Check one proof per chunk against a verifier's prefill (row ``i`` = position ``i``)."""
    if len(proofs) != len(chunks):
        return VerifyResult(False, (), f"expected {len(chunks)} proofs, got {len(proofs)}")
    size = 2 + 2 * topk
    if any(len(proof) != size for proof in proofs):
        return VerifyResult(False, (), f"every proof must be {size} bytes")
    checks = tuple(
        _check_chunk(IndexPolynomial.from_bytes(proof), flat, thresholds)
        for proof, flat in zip(proofs, _chunk_values(prefill_states, 0, chunks), strict=True)
    )
    failed = [i for i, check in enumerate(checks) if not check.ok]
    if not failed:
        return VerifyResult(True, checks)
    excess = _excess(checks[failed[0]], thresholds)
    return VerifyResult(False, checks, f"chunks {failed} exceed the thresholds ({excess})")


def _chunk_values(
    rows: np.ndarray, first_position: int, chunks: Sequence[range]
) -> Iterator[np.ndarray]:
    """The flattened bf16 bits of each chunk, checking every chunk lies within ``rows``."""
    bits = _as_bits(rows)
    for chunk in chunks:
        start, stop = chunk.start - first_position, chunk.stop - first_position
        if not 0 <= start < stop <= bits.shape[0]:
            covered = f"[{first_position}, {first_position + bits.shape[0]})"
            raise ValueError(f"chunk {chunk} is not within the rows' positions {covered}")
        yield bits[start:stop].ravel()


def _excess(check: ChunkCheck, thresholds: Thresholds) -> str:
    """The measures of a failed chunk that are over their bounds, for a one-line reason."""
    measures = (
        ("exp mismatches", check.exp_mismatches, thresholds.exp_mismatches),
        ("mantissa error mean", check.mant_err_mean, thresholds.mant_err_mean),
        ("mantissa error median", check.mant_err_median, thresholds.mant_err_median),
    )
    return ", ".join(
        f"{label} {value:g} > {bound:g}" for label, value, bound in measures if value > bound
    )


def _as_bits(hidden_states: np.ndarray) -> np.ndarray:
    hidden_states = np.asarray(hidden_states)
    if hidden_states.ndim != 2:
        raise ValueError(f"hidden_states must be [positions, hidden], got {hidden_states.shape}")
    return bfloat16_bits(hidden_states)


def _check_chunk(poly: IndexPolynomial, chunk: np.ndarray, thresholds: Thresholds) -> ChunkCheck:
    topk = len(poly.coeffs)
    flat = chunk.ravel()
    indices = top_indices(flat, topk)
    if poly.modulus == 0:  # the reference's null proof: nothing was committed
        return ChunkCheck(topk, _NO_MATCH, _NO_MATCH, False)
    # Indices are reduced by the proof's modulus first, as the reference's C++ verifier does
    # (its Python path skips this and misjudges honest prompt proofs whose modulus < 65497).
    claimed = poly(indices).astype(np.int64)
    actual = flat[indices].astype(np.int64)
    exp_match = (claimed & _EXP_MASK) == (actual & _EXP_MASK)
    mant_errs = np.abs((claimed & _MANT_MASK) - (actual & _MANT_MASK))[exp_match]
    mismatches = int(topk - exp_match.sum())
    if mant_errs.size:
        mean, median = float(mant_errs.mean()), float(np.median(mant_errs))
    else:
        mean = median = _NO_MATCH
    ok = (
        mismatches <= thresholds.exp_mismatches
        and mean <= thresholds.mant_err_mean
        and median <= thresholds.mant_err_median
    )
    return ChunkCheck(mismatches, mean, median, ok)
