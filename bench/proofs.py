"""What activation proofs cost next to generation, on SmolLM2 with one torch thread.

Generates ``--tokens`` tokens greedily, splits the reply into checkpoints of ``--interval``
tokens, proves and signs each one as the node does (``prove_checkpoint`` with the activation
prover), then verifies each as a verifier does (``verify_bundle``: one prefill per reply,
shared by its checkpoints, for the activations and every sampled token's choice).

Generation is timed without hidden-state capture, and the rows the node would have captured
come from one prefill over prompt + output instead. Capture during decoding yields the same
rows (tests/proofs/test_verify.py proves captured rows and verifies them by prefill), so
the proofs are the same; this keeps the generation figure a plain decode and the script
independent of how a backend streams captured rows.

Run: ``python bench/proofs.py [--tokens 200] [--interval 100]``. Every figure comes from
this one run; targets are printed beside them, nothing is asserted.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
from eth_utils import keccak
from rich.console import Console
from rich.table import Table

from inferledger.inference import GenerationParams, Token
from inferledger.inference.sampling import SAMPLER
from inferledger.proofs.activation import PROOF_BYTES
from inferledger.proofs.provers import (
    ActivationProver,
    CheckpointWork,
    ProvedCheckpoint,
    SegmentWork,
    prove_checkpoint,
)
from inferledger.proofs.sampling import Sampling
from inferledger.proofs.transcript import TranscriptHash
from inferledger.proofs.verify import (
    ReplyTranscript,
    VerifierModel,
    sharing_prefills,
    verify_bundle,
)

QUESTION = [{"role": "user", "content": "Write a long, detailed story about a lighthouse keeper."}]
HOST_KEY = bytes.fromhex("01" * 32)
MARKETPLACE = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
SALT = keccak(b"bench session salt")
SAMPLED = Sampling(temperature=0.7, top_p=0.95, repetition_penalty=1.1, seed=1)
"""As the demo samples: the verifier recomputes each choice under the user's seed."""


def checkpoints(
    prompt: list[int], output: list[int], rows: np.ndarray, interval: int
) -> list[CheckpointWork]:
    """One reply's checkpoints as the node builds them: the rows not yet proved each time."""
    works, chain = [], TranscriptHash(1)
    for index, start in enumerate(range(0, len(output), interval), start=1):
        end = min(start + interval, len(output))
        for token in output[start:end]:
            chain.update(token)
        segment = SegmentWork(tuple(prompt), tuple(output[:end]), start, sampling=SAMPLED)
        positions = segment.positions
        segment = replace(segment, hidden_states=rows[positions.start : positions.stop])
        works.append(
            CheckpointWork(
                session_id=1,
                chain_id=31337,
                marketplace=MARKETPLACE,
                checkpoint_index=index,
                model_id=keccak(b"HuggingFaceTB/SmolLM2-135M-Instruct"),
                token_start=start,
                token_end=end,
                transcript_hash=chain.value,
                segments=(segment,),
                backend="transformers",
                dtype="float32",
                salt=SALT,
                sampler=SAMPLER,
            )
        )
    return works


def proof_bytes(proved: ProvedCheckpoint, *, prompt_chunk: bool) -> int:
    """Activation proof bytes of a checkpoint, with or without its prompt chunk's proof."""
    total = sum(len(p) for s in proved.bundle.segments for p in s.activation_proofs)
    prompts = sum(s.reply_start == 0 for s in proved.bundle.segments)
    return total if prompt_chunk else total - prompts * PROOF_BYTES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200, help="tokens to generate")
    parser.add_argument("--interval", type=int, default=100, help="proof_interval in tokens")
    args = parser.parse_args()
    console = Console(width=110)

    from inferledger.inference.transformers_backend import TransformersBackend

    with console.status("loading SmolLM2..."):
        backend = TransformersBackend(num_threads=1)
        sum(1 for _ in backend.generate(QUESTION, GenerationParams(max_tokens=4)))  # warm up

    with console.status(f"generating {args.tokens} tokens..."):
        params = replace(SAMPLED.params(), max_tokens=args.tokens)
        start = time.perf_counter()
        output = [e.token_id for e in backend.generate(QUESTION, params) if isinstance(e, Token)]
        generation = time.perf_counter() - start
    prompt = backend.tokenize_chat(QUESTION)
    rows = backend.prefill_hidden_states(prompt + output)

    works = checkpoints(prompt, output, rows, args.interval)
    proved = [prove_checkpoint(ActivationProver(), work, HOST_KEY) for work in works]
    if any(p.fell_back for p in proved):
        raise SystemExit(f"a proof failed: {[p.error for p in proved]}")
    building = sum(p.seconds for p in proved)

    replies = [ReplyTranscript(tuple(prompt), tuple(output), 0, SAMPLED)]
    start = time.perf_counter()
    shared = sharing_prefills(VerifierModel.of(backend), replies)  # one prefill per reply
    verdicts = [verify_bundle(p.bundle, replies, shared, salt=SALT).status for p in proved]
    verification = time.perf_counter() - start

    tokens = len(output)
    with_prompt = sum(proof_bytes(p, prompt_chunk=True) for p in proved)
    decode_only = sum(proof_bytes(p, prompt_chunk=False) for p in proved)
    table = Table(title=f"activation proofs, SmolLM2, 1 thread, proof_interval {args.interval}")
    table.add_column("measurement")
    table.add_column("value", justify="right")
    table.add_row("prompt / generated tokens", f"{len(prompt)} / {tokens}")
    table.add_row(
        "generation (s, no capture)", f"{generation:.2f} ({tokens / generation:.1f} tok/s)"
    )
    table.add_row(f"proofs for {len(proved)} checkpoints: prove + sign (s)", f"{building:.3f}")
    table.add_row("  % of generation time (target < 2%)", f"{100 * building / generation:.2f}%")
    table.add_row(
        "activation proof bytes per checkpoint",
        " / ".join(str(proof_bytes(p, prompt_chunk=True)) for p in proved),
    )
    table.add_row(
        "proof bytes per 100 tokens, prompt chunk included", f"{100 * with_prompt / tokens:.0f}"
    )
    table.add_row(
        "bytes per token, prompt chunk included (target <= 10)", f"{with_prompt / tokens:.2f}"
    )
    table.add_row("bytes per token, decode chunks only", f"{decode_only / tokens:.2f}")
    table.add_row(
        "encoded bundle bytes (JSON, hex)", " / ".join(str(len(p.encoded)) for p in proved)
    )
    table.add_row(
        "verification: one prefill, activations + every token's choice (s)",
        f"{verification:.3f}",
    )
    table.add_row("verdicts", ", ".join(verdicts))
    table.add_row("generation / verification (target >= 10x)", f"{generation / verification:.1f}x")
    console.print(table)


if __name__ == "__main__":
    main()
