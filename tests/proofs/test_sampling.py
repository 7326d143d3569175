"""The sampling check on real SmolLM2 runs: prefill forgeries, edited tokens, profiles.

A forger writes the text another way (a cheaper model: weights with 1% noise, or a decoder
layer dropped), then proves it with one honest prefill of the approved model. Its
activation proofs pass by construction; the check that the approved model *chose* each
token, under the user's seed, does not. Honest replies, greedy or sampled, float32 or
bfloat16 on either side, pass under the profile the bundle calls for.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest
import torch
from eth_account import Account
from eth_utils import keccak
from model_edits import perturbed

from inferledger.inference.base import Token
from inferledger.inference.sampling import SAMPLER
from inferledger.proofs.bundle import ProofBundle
from inferledger.proofs.provers import (
    ActivationProver,
    CheckpointWork,
    SegmentWork,
    prove_checkpoint,
)
from inferledger.proofs.sampling import GREEDY, Sampling
from inferledger.proofs.transcript import TranscriptHash
from inferledger.proofs.verify import ReplyTranscript, VerifierModel, verify_bundle

HOST_KEY = bytes.fromhex("55" * 32)
SALT = keccak(b"sampling salt")
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
TOKENS = 100
SAMPLED = Sampling(temperature=0.7, top_p=0.95, seed=4242)


def generate(
    backend, sampling: Sampling, messages=STORY
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    params = replace(sampling.params(), max_tokens=TOKENS)
    ids = [e.token_id for e in backend.generate(messages, params) if isinstance(e, Token)]
    return tuple(backend.tokenize_chat(messages)), tuple(ids)


def bundle_for(
    prompt: tuple[int, ...],
    reply: tuple[int, ...],
    rows: np.ndarray,
    sampling: Sampling,
    dtype: str = "float32",
) -> ProofBundle:
    """One checkpoint over the whole reply, proved from ``rows`` (prompt + reply positions)."""
    chain = TranscriptHash(1)
    for token in reply:
        chain.update(token)
    work = CheckpointWork(
        session_id=1,
        chain_id=31337,
        marketplace="0x5FbDB2315678afecb367f032d93F642f64180aa3",
        checkpoint_index=1,
        model_id=keccak(b"smollm"),
        token_start=0,
        token_end=len(reply),
        transcript_hash=chain.value,
        segments=(SegmentWork(prompt, reply, 0, rows, sampling),),
        backend="transformers",
        dtype=dtype,
        salt=SALT,
        sampler=SAMPLER,
    )
    proved = prove_checkpoint(ActivationProver(), work, HOST_KEY)
    assert not proved.fell_back, proved.error
    return proved.bundle


def check(bundle, prompt, reply, sampling, verifier):
    kept = [ReplyTranscript(prompt, reply, 0, sampling)]
    return verify_bundle(
        bundle, kept, VerifierModel.of(verifier), salt=SALT, host=Account.from_key(HOST_KEY).address
    )


def forged(smollm, prompt, text, sampling):
    """``text`` proved by an honest prefill of the approved model: valid activations."""
    rows = smollm.prefill_hidden_states([*prompt, *text])
    return check(bundle_for(prompt, text, rows, sampling), prompt, text, sampling, smollm)


@contextmanager
def noisy(smollm, relative: float) -> Iterator[None]:
    """Another, cheaper-to-get model: ``relative`` noise on every weight matrix of every
    decoder layer (attention and MLP projections). Seeded so that both the greedy and the
    sampled text differ from the approved model's (seed 1's sampled text at 1% is the
    model's own: nothing forged, nothing to catch)."""
    weights = [p for p in smollm._model.model.layers.parameters() if p.dim() == 2]
    with perturbed(weights, relative, seed=2):
        yield


class _Skip(torch.nn.Module):
    def forward(self, hidden_states: torch.Tensor, **_: object) -> torch.Tensor:
        return hidden_states


@contextmanager
def dropped_layer(smollm, index: int = 15) -> Iterator[None]:
    """A truncated model: one decoder layer skipped."""
    layers = smollm._model.model.layers
    kept = layers[index]
    layers[index] = _Skip()
    try:
        yield
    finally:
        layers[index] = kept


FORGERS = {"noise-1%": lambda m: noisy(m, 0.01), "dropped-layer": dropped_layer}


@pytest.fixture(scope="module")
def honest(smollm):
    """The approved model's own replies, greedy and sampled with the user's seed."""
    return {sampling: generate(smollm, sampling) for sampling in (GREEDY, SAMPLED)}


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "t0.7"])
def test_honest_replies_pass_every_check(smollm, honest, sampling):
    prompt, reply = honest[sampling]
    rows = smollm.prefill_hidden_states([*prompt, *reply])
    verdict = check(bundle_for(prompt, reply, rows, sampling), prompt, reply, sampling, smollm)
    assert verdict.status == "pass", verdict.reason
    assert verdict.profile == "fp32"
    (choices,) = verdict.sampling
    assert (choices.positions, choices.exact) == (len(reply), len(reply))


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "t0.7"])
@pytest.mark.parametrize("forger", sorted(FORGERS))
def test_a_prefill_forgery_passes_the_activations_and_fails_the_sampling(
    smollm, honest, forger, sampling
):
    with FORGERS[forger](smollm):
        prompt, text = generate(smollm, sampling)  # the user's seed, the cheaper model
    assert text != honest[sampling][1]  # it is another text, not the approved model's
    verdict = forged(smollm, prompt, text, sampling)
    assert all(segment.ok for segment in verdict.segments)  # activations: valid by construction
    assert verdict.status == "fail", verdict.reason
    assert "not what the model would choose" in verdict.reason
    assert verdict.sampling[0].mismatches >= 1


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "t0.7"])
def test_an_edited_last_token_fails(smollm, honest, sampling):
    prompt, reply = honest[sampling]
    edited = (*reply[:-1], reply[-1] + 1)
    verdict = forged(smollm, prompt, edited, sampling)
    assert verdict.status == "fail", verdict.reason
    assert verdict.sampling[0].mismatches == 1  # exactly the last position


def test_a_reply_sampled_with_another_seed_fails(smollm, honest):
    """A host cannot pick its own seed (to steer the text): the user's decides."""
    prompt, text = generate(smollm, replace(SAMPLED, seed=SAMPLED.seed + 1))
    assert forged(smollm, prompt, text, SAMPLED).status == "fail"


def test_parameters_other_than_the_users_fail_before_the_model_runs(smollm, honest):
    prompt, reply = honest[SAMPLED]
    rows = smollm.prefill_hidden_states([*prompt, *reply])
    bundle = bundle_for(prompt, reply, rows, replace(SAMPLED, temperature=1.0))
    verdict = check(bundle, prompt, reply, SAMPLED, smollm)
    assert verdict.status == "fail" and "the user asked for" in verdict.reason
    other_seed = bundle_for(prompt, reply, rows, replace(SAMPLED, seed=7))
    verdict = check(other_seed, prompt, reply, SAMPLED, smollm)
    assert verdict.status == "fail" and "seed commitment" in verdict.reason


@pytest.fixture(scope="module")
def smollm_bf16():
    from inferledger.inference.transformers_backend import TransformersBackend

    return TransformersBackend(dtype="bfloat16")


@pytest.mark.parametrize("host_dtype", ["bfloat16", "float32"])
def test_bf16_on_either_side_gets_the_bf16_profile_and_honest_passes(
    smollm, smollm_bf16, host_dtype
):
    host, verifier = (smollm_bf16, smollm) if host_dtype == "bfloat16" else (smollm, smollm_bf16)
    prompt, reply = generate(host, SAMPLED)
    rows = host.prefill_hidden_states([*prompt, *reply])
    bundle = bundle_for(prompt, reply, rows, SAMPLED, dtype=host_dtype)
    verdict = check(bundle, prompt, reply, SAMPLED, verifier)
    assert verdict.profile == "bf16"
    assert verdict.status == "pass", verdict.reason


def test_an_unknown_dtype_is_unverifiable_not_failed(smollm, honest):
    prompt, reply = honest[GREEDY]
    rows = smollm.prefill_hidden_states([*prompt, *reply])
    bundle = bundle_for(prompt, reply, rows, GREEDY, dtype="float16")
    verdict = check(bundle, prompt, reply, GREEDY, smollm)
    assert verdict.status == "unverifiable"
    assert "float16" in verdict.reason and "--profile" in verdict.reason


@pytest.mark.parametrize(
    ("backend", "dtype", "sampler", "verifier_dtype", "expected"),
    [
        ("llama_cpp", "q8_0", SAMPLER, "float32", "llama_cpp"),
        ("transformers", "float32", SAMPLER, "q8_0", "llama_cpp"),
        ("llama_cpp", "q8_0", SAMPLER, "q8_0", "llama_cpp"),
        ("llama_cpp", "q8_0", SAMPLER, "bfloat16", None),  # never measured: no verdict
        ("transformers", "bfloat16", SAMPLER, "q8_0", None),
        ("llama_cpp", "q8_0", "remote", "float32", None),
        # computed from the GGUF's own Q4_1 (before the computed copy): other weights
        ("llama_cpp", "gguf", SAMPLER, "float32", None),
        ("llama_cpp", "float32", SAMPLER, "float32", "fp32"),
        ("vllm", "float32", SAMPLER, "float32", None),
    ],
)
def test_a_llama_cpp_side_gets_the_llama_cpp_profile(
    backend: str, dtype: str, sampler: str, verifier_dtype: str, expected: str | None
) -> None:
    from inferledger.proofs.profiles import profile_for

    profile = profile_for(backend, dtype, sampler, verifier_dtype)
    assert (profile.name if profile else None) == expected


def test_the_verifier_describes_itself_for_a_dispute(smollm, smollm_bf16):
    described = smollm.describe()
    assert described["weights_sha256"] == smollm.weights_sha256
    assert (described["engine"], described["dtype"], described["device"]) == (
        "transformers",
        "float32",
        "cpu",
    )
    assert described["attention"] and int(described["threads"]) >= 1
    assert described["torch"] == torch.__version__ and described["sampler"] == SAMPLER
    assert smollm_bf16.describe()["dtype"] == "bfloat16"
