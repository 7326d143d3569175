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
from dataclasses import dataclass
from typing import Any

import numpy as np
from eth_utils.crypto import keccak

from inferledger.inference.base import GenerationParams
from inferledger.inference.sampling import DEFAULT_SEED, gumbel_noise, penalised, scores


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
    """How far ``chosen`` fell short of ``best``, in logit units.

    With top-p, a machine whose numbers differ slightly may have cut the nucleus a few
    tokens earlier or later (at its edge tokens are often of nearly equal mass), and then
    the sampler picks among other tokens. So every nucleus holding ``chosen`` that the
    verifier's order allows is tried (``_nucleus_choices``); the gap is the smallest, over
    them, of the larger of two shifts: the one that would cut the nucleus there, and the
    one by which ``chosen`` trails the best score inside it."""
    if not 0 <= chosen < len(row):
        return float("inf")
    if params.temperature == 0 or params.top_p >= 1.0:
        return float(score[best] - score[chosen]) * (params.temperature or 1.0)
    return float(_nucleus_choices(row, params, position, before, score, chosen).min())


def _nucleus_choices(
    row: np.ndarray,
    params: GenerationParams,
    position: int,
    before: Sequence[int],
    score: np.ndarray,
    chosen: int,
) -> np.ndarray:
    """For each nucleus of the verifier's order (the ``k`` likeliest ids, ties by lowest
    id) that holds ``chosen`` and could be some machine's: the gap if it was that one.

    Cutting after the ``k``-th id takes the mass ``M`` of the ids before the cut to the
    ``top_p`` boundary: moving them all by ``d`` logits against the rest changes the odds
    ``M / (1 - M)`` by ``exp(d / temperature)``, so the shift is ``temperature`` times the
    log of the ratio of those odds to ``top_p / (1 - top_p)``. The verifier's own nucleus
    costs nothing; a token far below the edge costs the log-odds of the mass ahead of it,
    however flat the tail."""
    temperature, top_p = params.temperature, params.top_p
    z = penalised(row, before, params.repetition_penalty) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    target = probs[chosen]
    ahead = (probs > target) | ((probs == target) & (np.arange(len(probs)) < chosen))
    rank = int(np.count_nonzero(ahead))
    kept = np.flatnonzero(np.isfinite(score))  # the verifier's nucleus: ``score`` masks it
    if rank < len(kept):  # inside it: any cut from just after ``chosen`` to its end
        order = kept[np.argsort(-probs[kept], kind="stable")]
    else:  # below it: a wider cut costs more, so only the one just after ``chosen`` counts,
        order = np.append(np.flatnonzero(ahead), chosen)  # and only its total and max matter
    mass = np.cumsum(probs[order])
    mass_before = mass - probs[order]
    odds = np.log(top_p / (1.0 - top_p))
    with np.errstate(divide="ignore", invalid="ignore"):
        grow = odds - np.log(mass / (1.0 - mass))  # the cut moves down to the k-th id
        shrink = np.log(mass_before / (1.0 - mass_before)) - odds  # ... up to it
    cut = np.nan_to_num(np.maximum(np.maximum(grow, shrink), 0.0), nan=np.inf, posinf=np.inf)
    seed = DEFAULT_SEED if params.seed is None else params.seed
    noisy = z[order] + gumbel_noise(seed, position, len(z), order)
    trail = np.maximum.accumulate(noisy) - noisy[rank]
    gaps: np.ndarray = temperature * np.maximum(cut, trail)[rank:]
    return gaps
