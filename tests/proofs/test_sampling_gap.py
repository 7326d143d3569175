"""The sampling check's gap at the nucleus's edge, on made-up logits (no model).

With top-p, two honest machines may cut the nucleus one token apart when the mass there
sits next to ``top_p``; then the host samples among other tokens than the verifier. The gap
is then the shift that would move the cut there (nothing in that nucleus beats the host's
token), so such a choice is a near tie; a token far below the edge, or one the nucleus
holds but the noise did not pick, is not.
"""

from __future__ import annotations

import math

import numpy as np

from inferledger.inference.base import GenerationParams
from inferledger.inference.sampling import scores
from inferledger.proofs.sampling import Sampling, SamplingCheck, SamplingTolerance, check_sampling

T, TOP_P, SEED = 0.7, 0.95, 11
SAMPLING = Sampling(temperature=T, top_p=TOP_P, seed=SEED)
PARAMS = GenerationParams(temperature=T, top_p=TOP_P, seed=SEED)
A, B, C, D, E = range(5)
TOLERANCE = SamplingTolerance(near_tie=0.05, max_mismatches=0)


def logits_for(probs: list[float]) -> np.ndarray:
    """Logits whose tempered softmax is ``probs``."""
    return (T * np.log(np.array(probs))).astype(np.float64)


def log_odds(mass: float) -> float:
    return math.log(mass / (1 - mass))


def position_where(row: np.ndarray, wins: int, over: int, kept: list[int]) -> int:
    """The first reply position whose noise puts ``wins`` ahead of ``over`` by more than a
    logit when only ``kept`` compete (deterministic: the seed is fixed)."""
    unmasked = GenerationParams(temperature=T, top_p=1.0, seed=SEED)
    for position in range(2_000):
        s = scores(row, unmasked, position, [])
        if int(max(kept, key=lambda i: s[i])) == wins and (s[wins] - s[over]) * T > 1.0:
            return position
    raise AssertionError("no such position in 2,000")


def checked(row: np.ndarray, position: int, chosen: int) -> SamplingCheck:
    reply = [A] * position + [chosen]
    return check_sampling(row[None, :], [], reply, position, position + 1, SAMPLING, TOLERANCE)


def test_a_host_that_cut_the_nucleus_one_token_earlier_is_a_near_tie():
    # The verifier keeps A and B (the mass before B, 0.9495, is under 0.95); a host whose
    # A came out at 0.9505 kept A alone and had to choose it, though B's noise wins here.
    row = logits_for([0.9495, 0.03, 0.0105, 0.005, 0.005])
    position = position_where(row, wins=B, over=A, kept=[A, B])
    s = scores(row, PARAMS, position, [])
    assert int(np.argmax(s)) == B and (s[B] - s[A]) * T > 1.0  # the plain gap: a mismatch

    check = checked(row, position, A)
    assert math.isclose(check.worst_gap, T * (log_odds(TOP_P) - log_odds(0.9495)), rel_tol=1e-9)
    assert (check.near_ties, check.mismatches, check.ok) == (1, 0, True)


def test_a_host_that_cut_the_nucleus_one_token_later_is_a_near_tie():
    # The verifier keeps A alone (0.9505 >= 0.95); a host whose A came out at 0.9495 kept
    # B too, and B's noise won there.
    row = logits_for([0.9505, 0.029, 0.0105, 0.005, 0.005])
    position = position_where(row, wins=B, over=A, kept=[A, B])
    check = checked(row, position, B)
    assert math.isclose(check.worst_gap, T * (log_odds(0.9505) - log_odds(TOP_P)), rel_tol=1e-9)
    assert (check.near_ties, check.mismatches, check.ok) == (1, 0, True)


def test_a_forger_reaching_far_below_the_edge_pays_the_mass_ahead_of_its_token():
    # E's noise beats everything ahead of it, but 99.5% of the mass is ahead of E: the cut
    # would have to move by the log-odds between 0.995 and 0.95, however flat the tail.
    row = logits_for([0.9, 0.06, 0.025, 0.01, 0.005])
    position = position_where(row, wins=E, over=A, kept=[A, B, C, D, E])
    check = checked(row, position, E)
    assert check.worst_gap >= T * (log_odds(0.995) - log_odds(TOP_P)) > 1.5
    assert (check.mismatches, check.ok) == (1, False)


def test_a_token_with_all_the_mass_ahead_is_an_infinite_gap_not_a_huge_number():
    # So much mass ahead that 1 - mass rounds to 0: the cut would have to move without
    # bound, and the verdict's message says "inf", not a 300-digit figure.
    row = logits_for([1.0 - 1e-17, 1e-40, 1e-40, 1e-40, 1e-40])
    check = checked(row, 0, E)
    assert check.worst_gap == math.inf
    assert (check.mismatches, check.ok) == (1, False)


def test_inside_the_nucleus_nothing_is_forgiven():
    # Both A and B are kept, well inside the nucleus, and A's noise wins by over a logit:
    # choosing B is the plain score gap, as without a nucleus.
    row = logits_for([0.6, 0.3, 0.05, 0.03, 0.02])
    position = position_where(row, wins=A, over=B, kept=[A, B, C, D, E])
    s = scores(row, PARAMS, position, [])
    check = checked(row, position, B)
    assert math.isclose(check.worst_gap, (s[A] - s[B]) * T, rel_tol=1e-12)
    assert (check.mismatches, check.ok) == (1, False)
