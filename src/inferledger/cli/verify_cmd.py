"""`inferledger verify`: fetch a session's proof bundles and re-run the prefill."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast

import typer

from inferledger.cli.common import CliError, err, one_line_errors, out

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from inferledger.inference import Backend
    from inferledger.proofs.bundle import ProofBundle
    from inferledger.proofs.verify import ReplyTranscript
    from inferledger.sdk import SessionRecord
    from inferledger.sdk.verification import BundleUnavailable, Checkpoint, CheckpointVerdict

STYLES = {"pass": "green", "fail": "red", "unproven": "yellow", "unverifiable": "magenta"}


class VerifierBackend(StrEnum):
    transformers = "transformers"
    llama_cpp = "llama_cpp"
    scripted = "scripted"


class ProfileName(StrEnum):
    """``proofs.profiles.PROFILES``, for ``--profile``."""

    fp32 = "fp32"
    bf16 = "bf16"
    llama_cpp = "llama_cpp"
    scripted = "scripted"


def verify(
    session_id: Annotated[int, typer.Argument(help="The session to verify.", min=1)],
    backend: Annotated[
        VerifierBackend,
        typer.Option(
            "--backend",
            help="Model to re-run: transformers (the packaged SmolLM2 in float32), llama_cpp "
            "(the same GGUF in llama.cpp; needs the inferledger[llama] extra) or scripted "
            "(the test backend).",
        ),
    ] = VerifierBackend.transformers,
    record_file: Annotated[
        Path | None,
        typer.Option(
            "--record",
            metavar="FILE",
            help="The session's local record. Default: found by id in $INFERLEDGER_HOME/sessions.",
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds to wait for each bundle.")
    ] = 10.0,
    deployment: Annotated[
        Path | None,
        typer.Option(
            "--deployment",
            metavar="FILE",
            help="Deployment record: picks the right session record when sessions on several "
            "chains have this id. Default: the deployment_file setting.",
        ),
    ] = None,
    profile: Annotated[
        ProfileName | None,
        typer.Option(
            "--profile",
            help="Thresholds to judge by: fp32 (float32 host and verifier), bf16 (bfloat16 on "
            "either side), llama_cpp (llama.cpp on either side) or scripted. Default: the "
            "one the bundle's backend, dtype and sampler call for; a bundle no profile "
            "covers is 'unverifiable'.",
        ),
    ] = None,
    evidence_file: Annotated[
        Path | None,
        typer.Option(
            "--json",
            metavar="FILE",
            help="Also write what a dispute needs to FILE: each verdict with its profile, "
            "activation errors and sampling scores, and the verifier's weights, library "
            "versions, dtype, attention kernel and threads.",
        ),
    ] = None,
) -> None:
    """Check every checkpoint of a session you took part in: pass, fail, unproven or
    unverifiable.

    Fetches each proof bundle your receipts name (once, however many receipts name it)
    from the host's node, checks that it hashes to the proof_hash you signed, is signed
    by the host, sits where your receipts put it and matches the transcript you kept,
    then re-runs the prefill and compares the activations and every token's choice (the
    sampler is seeded by you, so a host that wrote the text another way is caught).
    Receipts signed before the session's first bundle name none (32 zero bytes):
    nothing to fetch, not a failure. Exits 1 if any checkpoint fails. Needs the
    session's local record (only the client that opened the session keeps the
    transcript); the chain is not needed. A bundle no profile covers is unverifiable.
    """
    from inferledger.sdk.verification import checkpoints, unnamed_receipts

    with one_line_errors():
        record = _find_record(session_id, record_file, deployment)
        points = checkpoints(record)
        unnamed = unnamed_receipts(record)
        console = err()
        if not points:
            console.print(
                f"session {session_id}: "
                + (
                    f"its {unnamed} receipts name no proof bundle yet (signed before the "
                    "session's first one): nothing to verify"
                    if unnamed
                    else "no receipts yet: nothing to verify"
                ),
                markup=False,
            )
            return
        fetched = _fetch_all(points, timeout, console)
        verdicts, verifier = _check_all(
            record, fetched, backend.value, console, profile.value if profile else None
        )
        if evidence_file is not None:
            _write_evidence(evidence_file, session_id, verdicts, verifier)
    _print(out(), session_id, verdicts, unnamed, len(record.receipts))
    if any(verdict.status == "fail" for verdict in verdicts):
        raise typer.Exit(1)


def _find_record(session_id: int, path: Path | None, deployment: Path | None) -> SessionRecord:
    from inferledger.config import load_settings
    from inferledger.sdk import SessionRecord
    from inferledger.sdk.records import RecordStore

    if path is not None:
        try:
            record = SessionRecord.model_validate_json(path.read_text())
        except FileNotFoundError:
            raise CliError(f"--record {path}: no such file") from None
        except ValueError as exc:
            raise CliError(f"--record {path} is not a session record: {exc}") from None
        if record.session_id != session_id:
            raise CliError(f"--record {path} is session {record.session_id}, not {session_id}")
        return record
    store = RecordStore()
    found = [r for r in store.list() if r.session_id == session_id]
    settings = load_settings(**({"deployment_file": deployment} if deployment else {}))
    if len(found) > 1 and settings.deployment_file.is_file():
        from inferledger.chain.deployment import Deployment

        deployed = Deployment.load(settings.deployment_file)
        marketplace = deployed.addresses.marketplace.lower()
        found = [
            r
            for r in found
            if r.chain_id == deployed.chain_id and r.marketplace.lower() == marketplace
        ]
    if not found:
        raise CliError(
            f"no local record of session {session_id} in {store.directory}: verifying needs "
            "the transcript the client kept; pass --record FILE (or set INFERLEDGER_HOME)"
        )
    if len(found) > 1:
        where = ", ".join(f"chain {r.chain_id} marketplace {r.marketplace}" for r in found)
        raise CliError(
            f"{len(found)} records of session {session_id} ({where}): pick one with "
            "--deployment FILE or --record FILE"
        )
    return found[0]


def load_verifier_backend(name: str, console: Console) -> Backend:
    """The model a verifier re-runs, loaded with a progress bar on a terminal."""
    from inferledger.inference import load_backend

    if name == "scripted":
        return load_backend("scripted")
    if name == "llama_cpp":
        return load_backend("llama_cpp", num_threads=1, sequences=1)
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    try:
        from inferledger.inference.transformers_backend import STAGES
    except ImportError:  # no torch: load_backend says how to install it
        return load_backend("transformers", num_threads=1)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task("loading SmolLM2", total=len(STAGES))

        def stage(label: str) -> None:
            done = STAGES.index(label) if label in STAGES else 0
            progress.update(task, completed=done, description=f"SmolLM2: {label}")

        return load_backend("transformers", num_threads=1, progress=stage)


def _warn_on_other_model(model: Backend, record: SessionRecord, console: Console) -> None:
    from eth_utils.crypto import keccak

    if "0x" + keccak(text=model.name).hex() != record.model_id.lower():
        console.print(
            f"warning: session {record.session_id} ran model {record.model_id}, the "
            f"{model.name} backend is model 0x{keccak(text=model.name).hex()}: activation "
            "checks will fail unless the weights are the same",
            style="yellow",
            markup=False,
        )


def _progress(console: Console) -> Progress:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


def _fetch_all(
    points: list[Checkpoint], timeout: float, console: Console
) -> list[tuple[Checkpoint, ProofBundle | BundleUnavailable]]:
    """Each checkpoint (a distinct named bundle) with its bundle, or why it could not be had."""
    import httpx

    from inferledger.sdk.verification import BundleUnavailable, fetch_bundle

    fetched: list[tuple[Checkpoint, ProofBundle | BundleUnavailable]] = []
    with httpx.Client() as http, _progress(console) as progress:
        task = progress.add_task("fetching proof bundles", total=len(points))
        for point in points:
            try:
                fetched.append((point, fetch_bundle(point, timeout=timeout, http=http)))
            except BundleUnavailable as exc:
                fetched.append((point, exc))
            progress.advance(task)
    return fetched


def _check_all(
    record: SessionRecord,
    fetched: list[tuple[Checkpoint, ProofBundle | BundleUnavailable]],
    backend: str,
    console: Console,
    profile_name: str | None = None,
) -> tuple[list[CheckpointVerdict], dict[str, object]]:
    """Verdicts in checkpoint order, and what ran them; the model is loaded only if there
    is a bundle to check (its tokenizer rebuilds the prompts, its prefill re-runs the
    activations and its head the token choices)."""
    from inferledger.proofs.evidence import Tokenize
    from inferledger.proofs.profiles import PROFILES
    from inferledger.proofs.verify import VerifierModel, sharing_prefills
    from inferledger.sdk.verification import (
        BundleUnavailable,
        missing_bundle,
        next_after,
        transcripts,
        verify_checkpoint,
    )

    profile = PROFILES[profile_name] if profile_name else None
    verifier: VerifierModel | None = None
    model = None
    replies: list[ReplyTranscript] = []
    if any(not isinstance(item, BundleUnavailable) for _, item in fetched):
        model = load_verifier_backend(backend, console)
        _warn_on_other_model(model, record, console)
        # cast: the record's messages are role/content dicts, which the backend validates.
        replies = transcripts(record, cast(Tokenize, model.tokenize_chat))
        verifier = sharing_prefills(VerifierModel.of(model), replies)  # one per reply
    verdicts = []
    after = 0  # where the previous bundle ends: the next starts no earlier
    with _progress(console) as progress:
        task = progress.add_task("re-running the prefill", total=len(fetched))
        for point, item in fetched:
            if isinstance(item, BundleUnavailable):
                verdict = missing_bundle(point, item.problem)
                after = next_after(after, point, None)
            else:
                assert verifier is not None
                progress.update(task, description=f"checkpoint {point.index}: re-running prefill")
                verdict = verify_checkpoint(
                    record,
                    point,
                    item,
                    verifier,
                    replies,
                    after=after,
                    profile=profile,
                )
                after = next_after(after, point, item)
            verdicts.append(verdict)
            progress.advance(task)
    described: dict[str, object] = {"backend": backend, "profile": profile_name or "per bundle"}
    if model is not None and hasattr(model, "describe"):
        described.update(model.describe())
    described["prefill_layout"] = "one prefill per reply, shared by its checkpoints"
    return verdicts, described


def _write_evidence(
    path: Path, session_id: int, verdicts: list[CheckpointVerdict], verifier: dict[str, object]
) -> None:
    import dataclasses
    import json
    import time

    document = {
        "session_id": session_id,
        "verified_at": int(time.time()),
        "verifier": verifier,
        "checkpoints": [dataclasses.asdict(verdict) for verdict in verdicts],
    }
    try:
        path.write_text(json.dumps(document, indent=2) + "\n")
    except OSError as exc:
        raise CliError(f"--json {path}: cannot write it ({exc.strerror})") from None


def _print(
    console: Console,
    session_id: int,
    verdicts: list[CheckpointVerdict],
    unnamed: int = 0,
    receipts: int = 0,
) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"session {session_id}: checkpoints re-verified")
    for column in ("checkpoint", "tokens", "prover", "result", "detail"):
        table.add_column(column)
    for verdict in verdicts:
        table.add_row(
            str(verdict.checkpoint),
            verdict.tokens,
            verdict.prover or "-",
            f"[{STYLES[verdict.status]}]{verdict.status}[/]",
            escape(verdict.reason),
        )
    console.print(table)
    counts = {status: sum(v.status == status for v in verdicts) for status in STYLES}
    console.print(
        f"{counts['pass']} pass, {counts['fail']} fail, {counts['unproven']} unproven, "
        f"{counts['unverifiable']} unverifiable",
        markup=False,
    )
    if unnamed:
        console.print(
            f"{unnamed} of {receipts} receipts name no proof bundle (signed before the "
            "session's first bundle, which covers their tokens): nothing to fetch for them, "
            "and no failure",
            markup=False,
        )
