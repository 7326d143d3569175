"""TOPLOC activation proofs: the encoding, the byte format, and honest vs. tampered SmolLM2 runs."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from inferledger.inference import GenerationParams
from inferledger.inference.base import Hidden, Token
from inferledger.proofs.activation import (
    CROSS_BACKEND,
    PROOF_BYTES,
    SAME_BACKEND,
    bfloat16_bits,
    build_proofs,
    chunk_bounds,
    proof_count,
    top_indices,
    verify_proofs,
)
from inferledger.proofs.polynomial import (
    PRIME,
    IndexPolynomial,
    evaluate,
    injective_modulus,
    interpolate,
)

# Polynomial encoding ---------------------------------------------------------------


def test_interpolation_through_a_line():
    # (1, 4), (2, 5), (3, 6) lie on y = x + 3: coefficients lowest degree first.
    assert interpolate(np.array([1, 2, 3]), np.array([4, 5, 6])).tolist() == [3, 1, 0]


def test_round_trip_evaluates_back_to_the_values():
    rng = np.random.default_rng(7)
    xs = rng.choice(PRIME, size=128, replace=False)
    ys = rng.integers(0, 2**16, size=128)
    coeffs = interpolate(xs, ys)
    assert coeffs.size == 128
    assert (evaluate(coeffs, xs) == ys % PRIME).all()


def test_large_indices_get_a_smaller_injective_modulus():
    xs = np.array([3, 3 + PRIME, 70_000, 123_456])  # 3 and 3 + PRIME collide modulo PRIME
    modulus = injective_modulus(xs)
    assert modulus < PRIME
    assert np.unique(xs % modulus).size == xs.size
    values = np.array([0x3F80, 0xBF80, 0x4000, 0x7F7F])
    poly = IndexPolynomial.through(xs, values)
    assert poly.modulus == modulus
    assert (poly(xs) == values).all()


def test_byte_layout_is_big_endian_modulus_then_coefficients():
    poly = IndexPolynomial(PRIME, (1, 2, 3, 4))
    data = poly.to_bytes()
    assert data == bytes.fromhex("ffd9 0001 0002 0003 0004")
    assert IndexPolynomial.from_bytes(data) == poly
    with pytest.raises(ValueError):
        IndexPolynomial.from_bytes(b"\xff\xd9\x00")


def test_interpolation_rejects_colliding_points():
    with pytest.raises(ValueError, match="distinct"):
        interpolate(np.array([1, 1 + PRIME]), np.array([1, 2]))


# Values and top-k --------------------------------------------------------------------


def test_bfloat16_rounding_matches_torch():
    rng = np.random.default_rng(1)
    values = (rng.standard_normal(200_000) * 10.0 ** rng.integers(-40, 38, 200_000)).astype(
        np.float32
    )
    values[:8] = [np.inf, -np.inf, 0.0, -0.0, 3.4e38, -3.4e38, 1e-40, 1.00390625]  # tie -> even
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.uint16).numpy()
    assert (bfloat16_bits(values) == expected).all()


def test_top_indices_rank_by_magnitude_and_break_ties_toward_low_indices():
    bits = bfloat16_bits(np.array([1.0, -5.0, 2.0, 2.0, -2.0, 0.5], dtype=np.float32))
    assert top_indices(bits, 1).tolist() == [1]
    assert top_indices(bits, 3).tolist() == [1, 2, 3]
    with pytest.raises(ValueError):
        top_indices(bits, 7)


# Proof format ------------------------------------------------------------------------


def planted(positions: int, prompt_len: int, hidden: int = 576, topk: int = 128) -> np.ndarray:
    """Small background values plus, per chunk, ``topk + 8`` values with distinct bf16
    magnitudes: the top-k set has no ties, so every implementation must pick the same one.
    In a prompt longer than the field, two planted indices collide modulo 65497."""
    flat = np.arange(positions * hidden, dtype=np.int64)
    states = (((flat * 7919) % 1021 - 510) / 1024).astype(np.float32).reshape(positions, hidden)
    planted_count = topk + 8
    for chunk, rows in enumerate(chunk_bounds(positions, prompt_len)):
        block = states[rows.start : rows.stop].reshape(-1)
        step = block.size // planted_count
        where = np.arange(planted_count) * step + chunk % step
        if block.size > PRIME + where[0]:
            where[1] = where[0] + PRIME
        rank = np.arange(planted_count)  # 0 is the largest
        block[where] = np.where(rank % 2, -1.0, 1.0) * (2 + (planted_count - 1 - rank) / 16)
    return states


# Bytes produced by PyPI toploc 0.1.6 (extension rebuilt against torch 2.13) from
# torch.from_numpy(planted(...)).to(torch.bfloat16), split into [prompt] + decode rows.
GOLDEN_SHA256 = "a435f6725de828a8fbdf675b51632818f7d02d2dee424b1ab52a822145719cc1"
GOLDEN_SMALL = ["ffd9402cbff2e7d9abe6", "ffd984996c79f9595573"]


def test_proof_count_and_size():
    states = planted(300 + 70, 300)
    proofs = build_proofs(states, 300)
    assert len(proofs) == proof_count(370, 300) == 1 + 3  # 32 + 32 + 6 decode rows
    assert all(len(p) == PROOF_BYTES == 258 for p in proofs)
    assert build_proofs(states[:300], 300) == proofs[:1]  # no output: the prompt proof only


def test_golden_vectors_from_the_reference_library():
    proofs = build_proofs(planted(370, 300), 300)
    assert int.from_bytes(proofs[0][:2], "big") < PRIME  # the collision forced a smaller modulus
    assert hashlib.sha256(b"".join(proofs)).hexdigest() == GOLDEN_SHA256
    small = build_proofs(planted(9, 3, hidden=16, topk=4), 3, decode_batch=32, topk=4)
    assert [p.hex() for p in small] == GOLDEN_SMALL


def reference_proofs(states: np.ndarray, prompt_len: int, topk: int = 128) -> list[bytes]:
    toploc = pytest.importorskip(
        "toploc",
        reason="PyPI toploc is not importable here (its extension needs a matching torch)",
        exc_type=ImportError,  # an installed wheel built for another torch fails to link
    )
    tensor = torch.from_numpy(states).to(torch.bfloat16)
    activations = [tensor[:prompt_len], *tensor[prompt_len:]]
    return toploc.build_proofs_bytes(activations, decode_batching_size=32, topk=topk)


def unambiguous(states: np.ndarray, rows: range, topk: int = 128) -> bool:
    """Whether the k-th and (k+1)-th magnitudes differ: only then is the top-k set unique
    (``torch.topk`` breaks ties in an implementation-defined way)."""
    magnitude = np.sort(bfloat16_bits(states[rows.start : rows.stop]).ravel() & 0x7FFF)[::-1]
    return magnitude.size == topk or magnitude[topk - 1] != magnitude[topk]


def test_bytes_equal_the_reference_library():
    states = planted(370, 300)
    assert build_proofs(states, 300) == reference_proofs(states, 300)
    rng = np.random.default_rng(3)
    compared = 0
    for _ in range(10):
        states = rng.standard_cauchy((200 + 50, 576)).astype(np.float32)  # few ties up top
        ours, theirs = build_proofs(states, 200), reference_proofs(states, 200)
        for mine, ref, rows in zip(ours, theirs, chunk_bounds(250, 200), strict=True):
            if unambiguous(states, rows):
                assert mine == ref
                compared += 1
        assert verify_proofs(theirs, states, 200).ok
    assert compared >= 10


# Verification on synthetic states ----------------------------------------------------


def test_verification_measures_small_and_large_drift():
    states = planted(100, 40)
    proofs = build_proofs(states, 40)
    exact = verify_proofs(proofs, states, 40, thresholds=SAME_BACKEND)
    assert exact.ok and exact.reason is None
    assert all(c.exp_mismatches == 0 and c.mant_err_mean == 0 for c in exact.chunks)
    near = verify_proofs(proofs, states * 1.01, 40)  # about one mantissa step in 128
    assert near.ok
    assert all(0 < c.mant_err_mean <= 2 for c in near.chunks)
    assert not verify_proofs(proofs, states * 1.01, 40, thresholds=SAME_BACKEND).ok
    far = verify_proofs(proofs, states * 1.10, 40)
    assert not far.ok and "chunks" in far.reason


def test_malformed_proof_lists_fail():
    states = planted(100, 40)
    proofs = build_proofs(states, 40)
    assert not verify_proofs(proofs[:-1], states, 40).ok
    assert not verify_proofs([*proofs[:-1], proofs[-1][:-2]], states, 40).ok
    null = bytes(PROOF_BYTES)  # the reference's placeholder when it failed to build a proof
    result = verify_proofs([null, *proofs[1:]], states, 40)
    assert not result.ok and not result.chunks[0].ok and result.chunks[1].ok


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError):
        build_proofs(np.zeros((4, 576), np.float32), 0)
    with pytest.raises(ValueError):
        build_proofs(np.zeros(576, np.float32), 1)


# The real model ------------------------------------------------------------------------

STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
OTHER = [{"role": "user", "content": "Explain how photosynthesis works in detail."}]


@pytest.fixture(scope="module")
def story(smollm):
    """A 100-token greedy generation: prompt ids, output ids, proofs, captured states."""
    params = GenerationParams(max_tokens=100, temperature=0)
    events = list(smollm.generate(STORY, params, capture_hidden_states=True))
    output = [e.token_id for e in events if isinstance(e, Token)]
    states = np.concatenate([e.rows for e in events if isinstance(e, Hidden)])
    assert len(output) == 100
    prompt = smollm.tokenize_chat(STORY)
    return prompt, output, build_proofs(states, len(prompt)), states


def test_honest_generation_verifies_with_both_profiles(smollm, story):
    prompt, output, proofs, _ = story
    assert len(proofs) == 1 + 4  # prompt, then 32 + 32 + 32 + 4 generated positions
    verifier_states = smollm.prefill_hidden_states(prompt + output)
    for thresholds in (CROSS_BACKEND, SAME_BACKEND):
        result = verify_proofs(proofs, verifier_states, len(prompt), thresholds=thresholds)
        assert result.ok, result


def test_honest_bytes_equal_the_reference_where_top_k_is_unique(story):
    prompt, _, proofs, states = story
    ref = reference_proofs(states, len(prompt))
    rows = chunk_bounds(states.shape[0], len(prompt))
    unique = [i for i, r in enumerate(rows) if unambiguous(states, r)]
    assert unique, "every chunk has a tie at the top-k boundary"
    assert [proofs[i] for i in unique] == [ref[i] for i in unique]


def test_a_changed_token_fails(smollm, story):
    prompt, output, proofs, _ = story
    altered = list(output)
    altered[40] ^= 1  # a neighbouring token id
    result = verify_proofs(
        proofs, smollm.prefill_hidden_states(prompt + altered), len(prompt), thresholds=SAME_BACKEND
    )
    assert not result.ok
    # Positions before the change are untouched; output token 40 sits in the third chunk.
    assert [c.ok for c in result.chunks] == [True, True, False, False, False]


@contextmanager
def scaled_weight(smollm, module: str, factor: float) -> Iterator[None]:
    """Temporarily serve a slightly different model: one layer's weights scaled."""
    weight = smollm._model.model.get_submodule(module).weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(factor)
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_a_different_model_fails(smollm, story):
    prompt, output, proofs, _ = story
    with scaled_weight(smollm, "layers.29.mlp.down_proj", 1.1):
        states = smollm.prefill_hidden_states(prompt + output)
    result = verify_proofs(proofs, states, len(prompt), thresholds=SAME_BACKEND)
    assert not any(c.ok for c in result.chunks)


def test_another_conversation_fails_both_profiles(smollm, story):
    _, output, proofs, _ = story
    other = smollm.tokenize_chat(OTHER)
    states = smollm.prefill_hidden_states(other + output)
    for thresholds in (CROSS_BACKEND, SAME_BACKEND):
        assert not verify_proofs(proofs, states, len(other), thresholds=thresholds).ok
