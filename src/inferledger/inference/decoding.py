"""The decode loop every local backend runs, so every backend follows the same rules.

A backend supplies one ``step``: feed tokens, get back their final-norm hidden states and
the next-token logits after the last of them. Everything else — the verifiable sampler,
end-of-turn ids, stop strings, the order of :class:`Hidden` events — lives here once, so a
llama.cpp host and a transformers host pick their tokens by the same rules
(docs/proofs.md, "Sampling").
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence

import numpy as np

from inferledger.inference.base import Event, Finish, FinishReason, GenerationParams, Hidden
from inferledger.inference.sampling import sample_next
from inferledger.inference.textstream import TokenStream

Step = Callable[[list[int]], tuple[np.ndarray, np.ndarray]]
"""Feed token ids after those already fed; return their hidden rows (float32,
``[len, hidden]``) and the logits after the last one."""


def check_room(prompt_tokens: int, context_length: int) -> int:
    """How many tokens fit after the prompt; ValueError when none do."""
    room = context_length - prompt_tokens
    if room < 1:
        raise ValueError(f"prompt is {prompt_tokens} tokens; the context holds {context_length}")
    return room


def decode(
    prompt_ids: list[int],
    params: GenerationParams,
    limit: int,
    *,
    capture: bool,
    step: Step,
    eos_ids: frozenset[int],
    detokenize: Callable[[Sequence[int]], str],
) -> Generator[Event, None, None]:
    """Generate at most ``limit`` tokens after ``prompt_ids``: Token (and, with ``capture``,
    Hidden) events, then one Finish."""
    stream = TokenStream(detokenize, params.stop)
    fed = 0  # positions already run through the model
    generated: list[int] = []
    step_input = prompt_ids
    reason: FinishReason = "length"
    while len(generated) < limit:
        rows, logits = step(step_input)
        if capture:
            yield Hidden(fed, rows)
        fed += len(step_input)
        token_id = sample_next(logits, params, len(generated), [*prompt_ids, *generated])
        if token_id in eos_ids:
            reason = "stop"
            break
        generated.append(token_id)
        yield from stream.push(token_id)
        if stream.stopped:
            reason = "stop"
            break
        step_input = [token_id]
    yield from stream.finish()
    if capture and fed < len(prompt_ids) + len(generated):
        # The last sampled token was never fed back; one more step gives its state.
        yield Hidden(fed, step(generated[-1:])[0])
    yield Finish(reason=reason, prompt_tokens=len(prompt_ids))
