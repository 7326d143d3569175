"""GenerationParams validation, message checks and the samplers."""

from __future__ import annotations

import pytest
import torch

from inferledger.inference.base import GenerationParams, validate_messages
from inferledger.inference.sampling import make_generator, sample_next


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 0},
        {"temperature": -0.1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"stop": ("",)},
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


LOGITS = torch.tensor([0.0, 3.0, 2.9, -1.0, 1.0])


def test_greedy_is_argmax():
    params = GenerationParams(temperature=0)
    assert sample_next(LOGITS, params, make_generator(None)) == 1


def test_same_seed_same_draws_and_different_seeds_differ():
    params = GenerationParams(temperature=1.0)

    def draws(seed):
        generator = make_generator(seed)
        return [sample_next(LOGITS, params, generator) for _ in range(40)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_top_p_keeps_only_the_nucleus():
    # At T=1 the top two tokens hold 0.47 and 0.43 of the mass: with top_p=0.6 the second
    # one is needed to reach 0.6, the third (0.06) is not.
    params = GenerationParams(temperature=1.0, top_p=0.6)
    generator = make_generator(0)
    seen = {sample_next(LOGITS, params, generator) for _ in range(300)}
    assert seen == {1, 2}


def test_tiny_top_p_is_greedy():
    params = GenerationParams(temperature=5.0, top_p=1e-6)
    generator = make_generator(0)
    assert {sample_next(LOGITS, params, generator) for _ in range(50)} == {1}
