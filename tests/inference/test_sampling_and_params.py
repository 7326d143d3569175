"""GenerationParams validation, message checks and the samplers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from eth_utils.crypto import keccak

from inferledger.inference.base import GenerationParams, validate_messages
from inferledger.inference.sampling import gumbel_noise, nucleus, position_key, sample_next


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 0},
        {"temperature": -0.1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"stop": ("",)},
        {"repetition_penalty": 0.9},
        {"seed": -1},
    ],
)
def test_bad_params_are_rejected(kwargs):
    with pytest.raises(ValueError):
        GenerationParams(**kwargs)


def test_stop_given_as_a_bare_string_is_a_type_error():
    with pytest.raises(TypeError):
        GenerationParams(stop="\n")


def test_stop_list_is_stored_as_tuple():
    assert GenerationParams(stop=["a", "b"]).stop == ("a", "b")


def test_validate_messages_rejects_unknown_roles_and_non_text():
    with pytest.raises(ValueError, match="role"):
        validate_messages([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="content"):
        validate_messages([{"role": "user", "content": None}])
    with pytest.raises(ValueError, match="empty"):
        validate_messages([])


def test_validate_messages_drops_extra_keys():
    assert validate_messages([{"role": "user", "content": "hi", "name": "x"}]) == [
        {"role": "user", "content": "hi"}
    ]


LOGITS = np.array([0.0, 3.0, 2.9, -1.0, 1.0], dtype=np.float32)


def draw(params: GenerationParams, position: int = 0) -> int:
    return sample_next(LOGITS, params, position, [])


def test_greedy_is_argmax_and_ignores_the_seed():
    assert {draw(GenerationParams(temperature=0, seed=s)) for s in range(20)} == {1}


def test_a_draw_is_a_pure_function_of_seed_and_position():
    params = GenerationParams(temperature=1.0, seed=7)
    first = [draw(params, p) for p in range(60)]
    assert first == [draw(params, p) for p in range(60)]  # no hidden RNG state
    assert first != [draw(GenerationParams(temperature=1.0, seed=8), p) for p in range(60)]
    assert len(set(first)) > 1


def test_draws_follow_the_softmax():
    """Gumbel-max samples exactly softmax(logits / T): over 4,000 positions the share of
    each token is within 0.03 of its probability."""
    params = GenerationParams(temperature=1.0, seed=3)
    counts = np.bincount([draw(params, p) for p in range(4000)], minlength=len(LOGITS))
    probs = np.exp(LOGITS - LOGITS.max())
    probs /= probs.sum()
    assert np.abs(counts / counts.sum() - probs).max() < 0.03


def test_top_p_keeps_only_the_nucleus():
    # At T=1 the top two tokens hold 0.47 and 0.43 of the mass: with top_p=0.6 the second
    # one is needed to reach 0.6, the third (0.06) is not.
    params = GenerationParams(temperature=1.0, top_p=0.6, seed=0)
    assert {draw(params, p) for p in range(300)} == {1, 2}


def test_tiny_top_p_is_greedy():
    params = GenerationParams(temperature=5.0, top_p=1e-6, seed=0)
    assert {draw(params, p) for p in range(50)} == {1}


def test_the_repetition_penalty_lowers_tokens_already_seen():
    greedy = GenerationParams(temperature=0, repetition_penalty=1.5)
    assert sample_next(LOGITS, greedy, 0, []) == 1
    # 3.0 / 1.5 = 2.0 < 2.9: token 1 seen before, token 2 wins.
    assert sample_next(LOGITS, greedy, 0, [1]) == 2


def test_the_noise_is_the_published_keystream():
    """Position keys and uniforms as docs/proofs.md defines them (a second implementation
    can check itself against these)."""
    key = position_key(5, 2)
    assert key == keccak(
        b"inferledger/sampler/v1" + (5).to_bytes(8, "big") + (2).to_bytes(8, "big")
    )
    noise = gumbel_noise(5, 2, 4)
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(32))
    words = [int.from_bytes(stream[i : i + 8], "little") for i in range(0, 32, 8)]
    expected = [-math.log(-math.log(((w >> 11) + 0.5) / 2**53)) for w in words]
    assert noise.tolist() == pytest.approx(expected, rel=1e-12)


def _nucleus_by_full_sort(z: np.ndarray, top_p: float) -> np.ndarray:
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    mass_before = np.cumsum(probs[order]) - probs[order]
    keep = np.zeros(len(z), dtype=bool)
    keep[order[mass_before < top_p]] = True
    return keep


@pytest.mark.parametrize("scale", [0.5, 3.0, 10.0])
def test_the_nucleus_is_the_full_sorts_however_few_ids_it_sorts(scale):
    """The partial sort is an optimisation, not a second definition: same set as sorting
    the whole vocabulary, ties (lowest id first) included."""
    rng = np.random.default_rng(int(scale * 10))
    for row in rng.standard_normal((8, 49152)) * scale:
        for top_p in (0.05, 0.5, 0.9, 0.95, 0.999):
            assert (nucleus(row, top_p) == _nucleus_by_full_sort(row, top_p)).all()
    tied = np.zeros(500)
    tied[:10] = 4.0
    for top_p in (0.3, 0.5, 0.99):
        assert (nucleus(tied, top_p) == _nucleus_by_full_sort(tied, top_p)).all()
