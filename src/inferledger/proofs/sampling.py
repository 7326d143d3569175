"""Checking that the approved model *chose* the tokens, not only that it can explain them.

Activation proofs bind hidden states to the tokens; a host could still write the tokens
with a cheaper model and prove them with one prefill of the approved one. The sampler is
deterministic (``inference.sampling``), so a verifier with its own logits, the sampling
parameters and the user's seed recomputes every position's choice. Where the host's token
is not the verifier's, the gap between the two in the sampler's scores (in logit units) is
what decides: within ``near_tie`` it is numerical noise between machines, beyond it a
mismatch. A segment passes with at most ``max_mismatches`` of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from eth_utils.crypto import keccak

from inferledger.inference.base import GenerationParams
from inferledger.inference.sampling import DEFAULT_SEED, nucleus, penalised, scores


@dataclass(frozen=True, slots=True)
class Sampling:
    """How one reply was sampled, as the user asked (``seed`` None: the default 0)."""

    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    @property
    def effective_seed(self) -> int:
        return DEFAULT_SEED if self.seed is None else self.seed

    def params(self) -> GenerationParams:
        return GenerationParams(
            temperature=self.temperature,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.effective_seed,
        )


GREEDY = Sampling()


def sampling_of(params: Mapping[str, Any]) -> Sampling:
    """What a reply's parameters asked of the sampler, with the node's defaults for the
    ones not given (docs/protocol.md, ``prompt``)."""
    return Sampling(
        temperature=float(params.get("temperature", 0.0)),
        top_p=float(params.get("top_p", 1.0)),
        repetition_penalty=float(params.get("repetition_penalty", 1.0)),
        seed=params.get("seed"),
    )


def seed_commitment(seed: int, salt: bytes) -> bytes:
    """What a public bundle holds of the seed: salted, so a stranger cannot try seeds."""
    if len(salt) != 32:
        raise ValueError(f"salt must be 32 bytes, got {len(salt)}")
    return keccak(b"inferledger/seed/v2" + salt + seed.to_bytes(8, "big"))


@dataclass(frozen=True, slots=True)
class SamplingTolerance:
    """``near_tie``: the largest score gap (logit units) still taken as machine noise;
    ``max_mismatches``: positions per segment allowed beyond it."""

    near_tie: float
    max_mismatches: int


@dataclass(frozen=True, slots=True)
class SamplingCheck:
    """One segment's positions: equal to the verifier's choice, within a near tie, or not;
    ``worst_gap`` is the largest gap seen (0 when every token matched)."""

    positions: int
    exact: int
    near_ties: int
    mismatches: int
    worst_gap: float
    ok: bool


def check_sampling(
    logits: np.ndarray,
    prompt_ids: Sequence[int],
    reply_ids: Sequence[int],
    reply_start: int,
    reply_end: int,
    sampling: Sampling,
    tolerance: SamplingTolerance,
) -> SamplingCheck:
    """Recompute the choice of reply tokens ``[reply_start, reply_end)``.

    ``logits`` row ``k`` is the verifier's next-token logits that chose reply token
    ``reply_start + k`` (after position ``len(prompt_ids) + reply_start + k - 1`` of
    ``prompt_ids + reply_ids``)."""
    params = sampling.params()
    context = [*prompt_ids, *reply_ids]
    exact = near = mismatched = 0
    worst = 0.0
    for j in range(reply_start, reply_end):
        row = logits[j - reply_start]
        before = context[: len(prompt_ids) + j]
        chosen = reply_ids[j]
        score = scores(row, params, j, before)
        best = int(np.argmax(score))
        if chosen == best:
            exact += 1
            continue
        gap = _gap(row, params, j, before, score, best, chosen)
        worst = max(worst, gap)
        if gap <= tolerance.near_tie:
            near += 1
        else:
            mismatched += 1
    return SamplingCheck(
        positions=reply_end - reply_start,
        exact=exact,
        near_ties=near,
        mismatches=mismatched,
        worst_gap=worst,
        ok=mismatched <= tolerance.max_mismatches,
    )


def _gap(
    row: np.ndarray,
    params: GenerationParams,
    position: int,
    before: Sequence[int],
    score: np.ndarray,
    best: int,
    chosen: int,
) -> float:
    """How far ``chosen`` fell short of ``best``, in logit units. Outside the verifier's
    nucleus it is measured without the mask (a token at the nucleus's edge may fall on
    either side on another machine), plus the gap to the edge."""
    if not 0 <= chosen < len(row):
        return float("inf")
    scale = params.temperature or 1.0
    if np.isfinite(score[chosen]):
        return float(score[best] - score[chosen]) * scale
    z = penalised(row, before, params.repetition_penalty) / params.temperature
    unmasked = scores(row, replace(params, top_p=1.0), position, before)
    kept = nucleus(z, params.top_p)
    edge = float(z[kept].min() - z[chosen]) * scale  # how far below the last kept token
    return max(float(unmasked[best] - unmasked[chosen]) * scale, edge)
