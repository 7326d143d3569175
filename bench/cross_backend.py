"""Proofs across backends: llama.cpp hosts checked by transformers verifiers, and back.

Part 1, honest: SmolLM2 replies made by one backend (captured rows, checkpoints every 100
session tokens, proved as a node does) are verified by the other backend's prefill, and
by llama.cpp itself. The profile is the one ``proofs/profiles.py`` picks from the bundle
(``llama_cpp`` whenever a side is llama.cpp); the table shows the worst activation errors
and token-choice gaps, which its thresholds must cover, and every checkpoint should pass.

Part 2, attacks on a host that names llama.cpp: a text written another way (one token
edited, weight noise, a dropped layer, bf16-rounded weights, the GGUF requantized to
Q4_0), proved by an honest llama.cpp prefill of the computed copy (so only the sampling
check can tell), or by the requantized model's own states. Each is judged twice: as a
llama.cpp bundle (``llama_cpp`` profile) and, for the same text proved by transformers,
as a float32 bundle (``fp32``): what the cross-backend profile gives up, row by row.

Run: ``python bench/cross_backend.py [--full]``. Quick (CI): one prompt per mode, one
sampled text per attack; ``--full``: 12 prompts per mode, 6 samples per attack and mode
(greedy and sampled).
Figures come from this one run; nothing is asserted. docs/proofs.md publishes them.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from transformers.utils import logging as hf_logging

import integrity as bench
from inferledger.inference import load_backend
from inferledger.proofs.profiles import FP32, LLAMA_CPP
from inferledger.proofs.verify import BundleVerdict, VerifierModel, verify_bundle

QUESTIONS = [
    "Tell me a story about a lighthouse keeper.",
    "Explain how a steam engine works.",
    "Write a letter to a friend about the mountains.",
    "Describe the history of the printing press.",
    "What should I pack for a week of hiking?",
    "Write a recipe for bread and explain each step.",
    "Describe a day in the life of a medieval blacksmith.",
    "Explain why the seasons change.",
    "Tell me about the planets of the solar system.",
    "How do bees make honey?",
    "Write a short essay on the value of libraries.",
    "Explain how a bicycle stays upright.",
]
MODES = ("greedy", "sampled")
TOKENS = 100


GAPS = bench.Meter()
"""Collects the gap of every token choice that was not exactly the verifier's."""
NEAR_TIES = (0.6, 1.0, 1.5, 2.0, 3.0)
MISMATCHES = (0, 1, 2)


@dataclass(frozen=True)
class Record:
    """One verified checkpoint: whether its activations passed, and its choices' gaps."""

    activation_ok: bool
    gaps: tuple[float, ...]

    @classmethod
    def of(cls, verdict: BundleVerdict) -> Record:
        """The gaps ``GAPS`` collected while ``verdict`` was reached."""
        return cls(all(segment.ok for segment in verdict.segments), tuple(GAPS.gaps))

    def fails(self, near_tie: float, mismatches: int) -> bool:
        return not self.activation_ok or sum(g > near_tie for g in self.gaps) > mismatches


@dataclass
class Honest:
    name: str
    checkpoints: int = 0
    passed: int = 0
    max_exp: int = 0
    max_mean: float = 0.0
    max_median: float = 0.0
    positions: int = 0
    non_exact: int = 0
    max_gap: float = 0.0
    profiles: set[str] = field(default_factory=set)
    records: list[Record] = field(default_factory=list)

    def add(self, verdict: BundleVerdict, record: Record) -> None:
        self.records.append(record)
        self.checkpoints += 1
        self.passed += verdict.status == "pass"
        self.profiles.add(verdict.profile or "-")
        for segment in verdict.segments:
            for chunk in segment.chunks:
                self.max_exp = max(self.max_exp, chunk.exp_mismatches)
                self.max_mean = max(self.max_mean, chunk.mant_err_mean)
                self.max_median = max(self.max_median, chunk.mant_err_median)
        for check in verdict.sampling:
            self.positions += check.positions
            self.non_exact += check.positions - check.exact
            self.max_gap = max(self.max_gap, check.worst_gap)


@dataclass
class Attack:
    name: str
    checkpoints: dict[str, int] = field(default_factory=lambda: {"llama_cpp": 0, "fp32": 0})
    caught: dict[str, int] = field(default_factory=lambda: {"llama_cpp": 0, "fp32": 0})
    records: list[Record] = field(default_factory=list)

    def add(self, profile: str, verdict: BundleVerdict, record: Record) -> None:
        if profile == "llama_cpp":
            self.records.append(record)
        self.checkpoints[profile] += 1
        self.caught[profile] += verdict.status == "fail"

    def rate(self, profile: str) -> str:
        total = self.checkpoints[profile]
        return (
            f"{self.caught[profile]}/{total} ({100 * self.caught[profile] / total:.0f}%)"
            if total
            else "-"
        )


def verify_all(
    replies: list[bench.Reply], host: str, dtype: str, verifier: Any
) -> list[tuple[BundleVerdict, Record]]:
    """Every checkpoint of the session, verified, with its activation result and gaps."""
    kept, bundles = bench.prove_session(replies, dtype, host)
    model = VerifierModel.of(verifier)
    results = []
    for bundle in bundles:
        GAPS.gaps = []
        verdict = verify_bundle(bundle, kept, model, salt=bench.SALT)
        results.append((verdict, Record.of(verdict)))
    return results


def requantized(source: Path, directory: Path) -> Path:
    """The GGUF requantized to Q4_0 by llama.cpp: what a host might serve to go faster."""
    import llama_cpp

    target = directory / "SmolLM2-135M-Instruct.Q4_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    status = llama_cpp.llama_model_quantize(
        str(source).encode(), str(target).encode(), ctypes.byref(params)
    )
    if status != 0:
        raise SystemExit(f"llama_model_quantize failed ({status})")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the calibration run")
    args = parser.parse_args()
    prompts = QUESTIONS[: 12 if args.full else 1]
    samples = 6 if args.full else 1
    modes = MODES if args.full else ("sampled",)
    console = Console(width=160)
    hf_logging.disable_progress_bar()
    os.environ.setdefault("TQDM_DISABLE", "1")  # the requantized GGUF's conversion bar
    GAPS.collect = True
    with GAPS.installed():
        run(console, prompts, samples, modes)


def sweep_table(honest: list[Honest], attacks: list[Attack]) -> Table:
    """Honest checkpoints failed and attacks caught at other sampling tolerances."""
    table = Table(
        title="3. the llama_cpp profile's sampling tolerance, swept (same checkpoints)",
        caption="a checkpoint fails when its activations fail or more than 'mism.' token "
        "choices fall short of the verifier's by more than near_tie logits",
    )
    table.add_column("near_tie", justify="right")
    table.add_column("mism.", justify="right")
    table.add_column("honest failed", justify="right")
    for attack in attacks:
        table.add_column(attack.name, justify="right")
    records = [record for row in honest for record in row.records]
    for near_tie in NEAR_TIES:
        for allowed in MISMATCHES:
            failed = sum(record.fails(near_tie, allowed) for record in records)
            cells = []
            for attack in attacks:
                caught = sum(record.fails(near_tie, allowed) for record in attack.records)
                cells.append(f"{caught}/{len(attack.records)}")
            table.add_row(f"{near_tie:g}", str(allowed), f"{failed}/{len(records)}", *cells)
    return table


def run(console: Console, prompts: list[str], samples: int, modes: tuple[str, ...]) -> None:
    transformers = load_backend("transformers", num_threads=1)
    llama = load_backend("llama_cpp", num_threads=1, sequences=1, context_length=2048)

    # Part 1 ---------------------------------------------------------------------------
    conditions = [
        ("llama.cpp host, transformers verifier", llama, "llama_cpp", "q8_0", transformers),
        ("transformers host, llama.cpp verifier", transformers, "transformers", "float32", llama),
        ("llama.cpp host, llama.cpp verifier", llama, "llama_cpp", "q8_0", llama),
    ]
    honest = []
    with console.status("part 1: honest replies") as status:
        for name, host, engine, dtype, verifier in conditions:
            row = Honest(name)
            for mode in MODES:
                status.update(f"part 1: {name}, {mode}")
                replies = [
                    bench.generate(host, bench.user(q), bench.sampling_for(mode, i), TOKENS)
                    for i, q in enumerate(prompts)
                ]
                for verdict, record in verify_all(replies, engine, dtype, verifier):
                    row.add(verdict, record)
            honest.append(row)
    table = Table(title="1. honest checkpoints across backends (target: 0 failed)")
    for column in (
        "condition",
        "profile",
        "ckpts",
        "failed",
        "max exp mism.",
        "max mant mean",
        "max mant median",
        "tokens",
        "non-exact",
        "max gap",
    ):
        table.add_column(column, justify="left" if column in ("condition", "profile") else "right")
    for row in honest:
        failed = row.checkpoints - row.passed
        table.add_row(
            row.name,
            ",".join(sorted(row.profiles)),
            str(row.checkpoints),
            f"[red]{failed}[/red]" if failed else "0",
            str(row.max_exp),
            f"{row.max_mean:.2f}",
            f"{row.max_median:.1f}",
            str(row.positions),
            str(row.non_exact),
            f"{row.max_gap:.3f}",
        )
    console.print(table)
    bounds = LLAMA_CPP.activation
    assert LLAMA_CPP.sampling is not None
    console.print(
        f"llama_cpp profile bounds: exp {bounds.exp_mismatches}, mant mean "
        f"{bounds.mant_err_mean}, median {bounds.mant_err_median}, near_tie "
        f"{LLAMA_CPP.sampling.near_tie} logits, {LLAMA_CPP.sampling.max_mismatches} mismatches"
    )

    # Part 2 ---------------------------------------------------------------------------
    with tempfile.TemporaryDirectory() as scratch:
        swapped = load_backend(
            "llama_cpp",
            gguf_path=requantized(Path(llama.weights_path), Path(scratch)),
            home=scratch,
            num_threads=1,
            sequences=1,
            context_length=2048,
        )
        writers: list[tuple[str, Any, Callable[[], AbstractContextManager[Any]]]] = [
            (
                "weight noise 1%",
                transformers,
                lambda: bench.altered(transformers, bench.weight_noise(0.01)),
            ),
            (
                "weight noise 5%",
                transformers,
                lambda: bench.altered(transformers, bench.weight_noise(0.05)),
            ),
            ("middle layer dropped", transformers, lambda: bench.dropped_layer(transformers)),
            (
                "bf16-rounded weights",
                transformers,
                lambda: bench.altered(transformers, bench.bf16_rounded),
            ),
            ("GGUF requantized to Q4_0", swapped, nullcontext),
        ]
        attacks = {name: Attack(name) for name, _, _ in writers}
        attacks["one token edited"] = Attack("one token edited")
        attacks["Q4_0, its own states"] = Attack("Q4_0, its own states")

        def judge(attack: Attack, prompt: list[int], output: list[int], sampling: Any) -> None:
            for profile, host, engine, dtype in (
                ("llama_cpp", llama, "llama_cpp", "q8_0"),
                ("fp32", transformers, "transformers", "float32"),
            ):
                forged = bench.proved_by_prefill(host, prompt, output, sampling)
                for verdict, record in verify_all([forged], engine, dtype, transformers):
                    attack.add(profile, verdict, record)

        with console.status("part 2: attacks") as status:
            for mode in modes:
                for index in range(samples):
                    question = QUESTIONS[(index + 5) % len(QUESTIONS)]
                    messages = bench.user(question)
                    sampling = bench.sampling_for(mode, 100 + index)
                    prompt = llama.tokenize_chat(messages)
                    for name, writer, context in writers:
                        status.update(f"part 2: {name}, {mode} {index + 1}/{samples}")
                        with context():
                            output = bench.text_of(writer, messages, sampling, TOKENS)
                        judge(attacks[name], prompt, bench.whole_checkpoints(output), sampling)
                    status.update(f"part 2: edits and own states, {mode} {index + 1}/{samples}")
                    honest_reply = bench.generate(llama, messages, sampling, TOKENS)
                    edited = list(honest_reply.output)
                    spot = len(edited) // 2
                    edited[spot] = bench.runner_up(llama, honest_reply, spot)
                    judge(attacks["one token edited"], prompt, edited, sampling)
                    own = bench.generate(swapped, messages, sampling, TOKENS)
                    for verdict, record in verify_all([own], "llama_cpp", "q8_0", transformers):
                        attacks["Q4_0, its own states"].add("llama_cpp", verdict, record)
        swapped.close()

    table = Table(
        title="2. attacks on a llama.cpp host: checkpoints failed (target: all)",
        caption="llama_cpp: proved by a llama.cpp prefill of the computed copy (or the Q4_0 "
        "model's own states), judged by the llama_cpp profile; fp32: the same text proved by "
        "a transformers prefill, judged by the fp32 profile",
    )
    table.add_column("attack")
    table.add_column("llama_cpp profile", justify="right")
    table.add_column("fp32 profile", justify="right")
    for attack in attacks.values():
        table.add_row(attack.name, attack.rate("llama_cpp"), attack.rate("fp32"))
    console.print(table)
    assert FP32.sampling is not None
    console.print(f"fp32 profile for comparison: near_tie {FP32.sampling.near_tie} logits")
    console.print(sweep_table(honest, list(attacks.values())))
    transformers.close()
    llama.close()


if __name__ == "__main__":
    main()
