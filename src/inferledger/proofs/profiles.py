"""Which thresholds a verifier applies: one profile per condition a bundle can name.

A bundle says which backend, dtype and sampler made it. An honest host must never fail on
another machine, so the verifier picks the profile that fits both sides: float32 on both
is checked tightly; bfloat16 on either side moves activations and logits by far more, so
its activation bounds are loose and the sampling check carries the weight. A combination
with no profile is reported "unverifiable", never "fail". docs/proofs.md publishes the
measurements behind each number (``bench/integrity.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from inferledger.inference.sampling import SAMPLER
from inferledger.proofs.activation import CROSS_BACKEND, SAME_BACKEND, Thresholds
from inferledger.proofs.sampling import SamplingTolerance


@dataclass(frozen=True, slots=True)
class Profile:
    """``sampling`` None: the backend's choices cannot be recomputed (a scripted test
    model), so only the activations are checked."""

    name: str
    activation: Thresholds
    sampling: SamplingTolerance | None


FP32 = Profile("fp32", SAME_BACKEND, SamplingTolerance(near_tie=0.002, max_mismatches=0))
"""Both sides float32 transformers. Honest runs (1 or 2 threads, one-pass or chunked
prefill, greedy or sampled) chose exactly the verifier's token at all 1,500 positions
measured, with hidden states within 8e-5, so a gap above 0.002 is a mismatch and none is
allowed. A forgery that leaves the approved reply at one of the model's own near ties
(0.0014 for 1% noise at t=0.7, docs/proofs.md) passes: it is nearly the model's reply."""

BF16 = Profile("bf16", CROSS_BACKEND, SamplingTolerance(near_tie=0.5, max_mismatches=0))
"""bfloat16 on either side: honest choices differed from the verifier's by up to 0.28
logits (94 of 4,702 tokens at t=0.7 and top_p 0.95, 24 replies, both directions, on a CPU
with native bf16 kernels; 0.26 and 95 of 4,140 at t=1.0 and top_p 0.9; greedy up to
0.17), so gaps up to 0.5 are noise; none beyond.
Loose by necessity: a perturbation within bf16's own noise (requantization, about 1%
weight noise) passes it, and the dtype is the host's claim (docs/architecture.md)."""

LLAMA_CPP = Profile(
    "llama_cpp",
    Thresholds(exp_mismatches=20, mant_err_mean=6.0, mant_err_median=5.0),
    SamplingTolerance(near_tie=0.6, max_mismatches=1),
)
"""llama.cpp (the computed copy's Q8_0 weights in 8-bit arithmetic, dtype ``q8_0``) on one
side, float32 transformers (the same weights) or llama.cpp on the other. Honest runs
(bench/cross_backend.py --full, 72 checkpoints in three directions) differed by up to 11
of 128 top-k exponents per chunk and mantissa errors up to 3.5 (mean) and 2 (median); 2.5%
of token choices were not the verifier's, and the tail is long: 2 checkpoints had one
choice more than 0.6 logits short, one of them 2.79 short. So one choice per segment may
be off by any amount, a second one by 0.6 at most: no honest checkpoint had two. It
catches a dropped layer, a requantized GGUF, 5% weight noise 9 times in 12 and an edited
token 10 in 12; not 1% noise or bf16-rounded weights (docs/proofs.md, "Across backends")."""

SCRIPTED = Profile("scripted", SAME_BACKEND, None)
"""The scripted test backend: its pseudo-states are exact, its tokens follow a script."""

PROFILES = {profile.name: profile for profile in (FP32, BF16, LLAMA_CPP, SCRIPTED)}


def profile_for(backend: str, dtype: str, sampler: str, verifier_dtype: str) -> Profile | None:
    """The profile for a bundle made by ``backend``/``dtype``/``sampler`` checked by a
    verifier computing in ``verifier_dtype``; None when no profile covers it."""
    if backend == "scripted" and sampler == "scripted":
        return SCRIPTED
    if backend not in ("transformers", "llama_cpp") or sampler != SAMPLER:
        return None
    dtypes = {dtype, verifier_dtype}
    if "q8_0" in dtypes:
        # llama.cpp against float32 or itself; with bfloat16 nothing has been measured.
        return LLAMA_CPP if dtypes <= {"q8_0", "float32"} else None
    if dtypes == {"float32"}:
        return FP32
    if dtypes <= {"float32", "bfloat16"}:
        return BF16
    return None
