"""`inferledger demo`: the seed incident's verification steps, done for real in one process.

Deploy the contracts, register a host serving SmolLM2 at $0.002/token, start its node on
loopback, open a 2 USDC session through the SDK, stream a real answer, checkpoint with
proofs, end, settle, re-verify the proofs by prefill, and print the table the seed's
operators wanted to see. Every figure in it is read back (from the node's HTTP API, the
SDK or the chain), never computed locally.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from inferledger.chain.anvil import free_port
from inferledger.chain.connect import connect
from inferledger.chain.devchain import build_dev_world, dev_account
from inferledger.chain.errors import ChainError
from inferledger.chain.units import format_usdc, price_per_token_to_mtok, usdc
from inferledger.config import Settings, load_settings
from inferledger.node.node import create_node
from inferledger.node.preflight import PreflightFailed
from inferledger.node.server import BackgroundServer
from inferledger.proofs.evidence import Tokenize
from inferledger.proofs.verify import VerifierModel
from inferledger.sdk import Client, Settlement
from inferledger.sdk.verification import (
    CheckpointVerdict,
    fetch_bundles,
    unnamed_receipts,
    verify_session,
)

if TYPE_CHECKING:
    from inferledger.inference.transformers_backend import TransformersBackend

DEPOSIT = usdc("2")
PRICE_PER_MTOK = price_per_token_to_mtok("0.002")
PROOF_INTERVAL = 100
MAX_TOKENS = 200
SAMPLING = {"temperature": 0.7, "top_p": 0.95, "repetition_penalty": 1.1, "seed": 1}
"""Sampled, not greedy (greedy SmolLM2 repeats itself), by the verifiable sampler: the
seed is the user's, so the verifier recomputes every token's choice. Fixed, so every run
of the demo tells the same story."""
QUESTION = (
    "What is a blockchain, and why would anyone pay for language model tokens with one? "
    "Explain in detail."
)


@dataclass(frozen=True)
class DemoResult:
    """What the demo read back at the end (the tests check these)."""

    session_id: int
    tokens: int
    """Output (reply) tokens paid."""
    input_tokens: int
    """Input (prompt) tokens paid (free on the demo host)."""
    settlement: Settlement
    host_earnings: int
    treasury: int
    refund: int
    verdicts: tuple[str, ...]


def run_demo(
    settings: Settings,
    *,
    question: str = QUESTION,
    max_tokens: int = MAX_TOKENS,
    console: Console | None = None,
) -> DemoResult:
    console = console or Console()
    backend = _load_model(console)
    chain = connect(settings.chain_url, **settings.sender_options())
    if not chain.is_dev:
        raise ChainError(
            f"{settings.chain_url} is not a dev chain: the demo mints test USDC; "
            "run it on the embedded chain (the default) or a local anvil (`inferledger chain`)"
        )
    port = free_port()
    with console.status("deploying the contracts and registering the host..."):
        world = build_dev_world(
            chain,
            # Free prompts, so the seed's figures (200 output tokens) stay exact.
            host_input_price_per_mtok=0,
            host_output_price_per_mtok=PRICE_PER_MTOK,
            host_url=f"ws://127.0.0.1:{port}/v1/ws",
            model_name=backend.name,
            weights_sha256=bytes.fromhex(backend.weights_sha256),
        )
    c = world.contracts
    console.print(f"[bold]chain[/] {chain.url} (chain id {chain.chain_id}, {chain.client})")
    for name, address in c.deployment.addresses:
        console.print(f"  {name:<15} {address}")

    with tempfile.TemporaryDirectory(prefix="inferledger-demo-") as workdir:
        work = Path(workdir)
        node_settings = load_settings(
            chain_url=chain.url,
            host_key="0x" + dev_account("host").key.hex(),
            state_db=work / "node.sqlite3",
            proof_store=work / "proofs",
            node_port=port,
        )
        node = create_node(node_settings, contracts=c, backend=backend)
        if not node.ready:
            raise PreflightFailed("; ".join(r.line() for r in node.preflight.failures))
        console.print(
            f"[bold]host[/] {node.address} serves {backend.name} at $0.002 per reply token, "
            f"prompts free; prover {node.prover.name}"
        )
        with BackgroundServer(node, port=port) as server:
            client = Client(
                chain,
                key=world.user.account.key,
                deployment=c.deployment,
                sessions_dir=work / "sessions",
            )
            result = _session(console, client, backend, server.url, question, max_tokens)
    _print_table(console, result, node.address)
    if result.host_earnings + result.treasury + result.refund != DEPOSIT:
        raise ChainError("settlement does not add up to the deposit: this is a bug, report it")
    return result


def _load_model(console: Console) -> TransformersBackend:
    # Imported here: torch takes seconds to import, and `--help` should not wait for it.
    from inferledger.inference.transformers_backend import STAGES, TransformersBackend

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("SmolLM2-135M", total=len(STAGES))

        def stage(name: str) -> None:
            progress.update(task, completed=STAGES.index(name), description=f"SmolLM2: {name}")

        backend = TransformersBackend(num_threads=1, progress=stage)
        progress.update(task, completed=len(STAGES))
    console.print(f"[bold]model[/] {backend.name} (sha256 {backend.weights_sha256[:16]}...)")
    return backend


def _session(
    console: Console,
    client: Client,
    backend: TransformersBackend,
    node_url: str,
    question: str,
    max_tokens: int,
) -> DemoResult:
    (offer,) = client.hosts.list(model=backend.name)
    refund_before = client.contracts.token.balance_of(client.account.address)
    session = client.sessions.open(offer, None, DEPOSIT, proof_interval=PROOF_INTERVAL)
    console.print(
        f"[bold]session {session.id}[/]: deposited {format_usdc(DEPOSIT)} USDC; a proof every "
        f"{PROOF_INTERVAL} tokens, receipts signed as the tokens stream\n"
    )
    console.print(f"[bold]user>[/] {question}\n[bold]SmolLM2>[/] ", end="")
    started = time.monotonic()
    messages = [{"role": "user", "content": question}]
    for text in session.stream_sync(messages, max_tokens=max_tokens, **SAMPLING):
        console.print(text, end="", markup=False, highlight=False)
    elapsed = time.monotonic() - started
    console.print(
        f"\n\n{session.tokens} reply tokens in {elapsed:.1f}s for a {session.input_tokens}-token "
        f"prompt, cost {format_usdc(session.cost)} USDC"
    )
    with console.status("ending the session; the node settles on chain..."):
        settlement = session.close()
    record = session.record
    bundles = fetch_bundles(record)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("verifying proofs by prefill", total=len(bundles))
        verdicts = []
        # cast: the record's messages are role/content dicts, which the backend validates.
        tokenize = cast(Tokenize, backend.tokenize_chat)
        for verdict in verify_session(record, bundles, VerifierModel.of(backend), tokenize):
            verdicts.append(verdict)
            progress.advance(task)
    unnamed = unnamed_receipts(record)
    if unnamed:
        console.print(
            f"{unnamed} of {len(record.receipts)} receipts were signed before the first proof "
            "bundle and name none; each bundle the receipts name is verified once"
        )
    checkpoints = httpx.get(
        f"{node_url}/v1/sessions/{session.id}", headers=record.read_headers(), timeout=10
    ).json()
    console.print(_checkpoint_table(checkpoints["checkpoints"], verdicts))
    host_earnings = client.host.earnings(offer.address)
    refund = client.contracts.token.balance_of(client.account.address) - (refund_before - DEPOSIT)
    return DemoResult(
        session_id=session.id,
        tokens=settlement.output_tokens,
        input_tokens=settlement.input_tokens,
        settlement=settlement,
        host_earnings=host_earnings,
        treasury=client.treasury.balance(),
        refund=refund,
        verdicts=tuple(v.status for v in verdicts),
    )


def _checkpoint_table(
    checkpoints: list[dict[str, object]], verdicts: list[CheckpointVerdict]
) -> Table:
    """The node's checkpoints, each with the verdict on its bundle (matched by proof hash;
    "not receipted" for a bundle no receipt names, which nobody paid for)."""
    table = Table(title="Proof generated, checkpoint stored, proof verified")
    for column in ("checkpoint", "tokens", "prover", "bytes", "ms", "state", "verified"):
        table.add_column(column)
    by_hash = {verdict.proof_hash: verdict for verdict in verdicts}
    for checkpoint in checkpoints:
        start, end = cast("list[int]", checkpoint["tokens"])  # JSON: [start, end]
        verdict = by_hash.get(str(checkpoint["proof_hash"]))
        table.add_row(
            str(checkpoint["index"]),
            f"{start}-{end}",
            str(checkpoint["prover"]),
            str(checkpoint["proof_bytes"]),
            str(checkpoint["proof_ms"]),
            str(checkpoint["status"]),
            "not receipted" if verdict is None else verdict.status,
        )
    return table


def _print_table(console: Console, result: DemoResult, host: str) -> None:
    settlement = result.settlement
    table = Table(
        title=f"Seed verification: {result.tokens} output tokens at $0.002/token, 2 USDC deposit"
    )
    table.add_column("step")
    table.add_column("result")
    table.add_column("read from")
    passed = sum(status == "pass" for status in result.verdicts)
    table.add_row(
        "proof generated",
        f"{len(result.verdicts)} checkpoints, {passed} verified by prefill",
        "node /v1/proofs + SmolLM2 prefill",
    )
    table.add_row(
        "checkpoint submitted", f"complete_session tx {settlement.tx_hash}", "node settled frame"
    )
    table.add_row(
        "payment distributed: host",
        f"{format_usdc(result.host_earnings)} USDC",
        f"client.host.earnings({host[:10]}...)",
    )
    table.add_row(
        "payment distributed: treasury",
        f"{format_usdc(result.treasury)} USDC",
        "client.treasury.balance()",
    )
    table.add_row("refund to the user", f"{format_usdc(result.refund)} USDC", "user's USDC balance")
    total = result.host_earnings + result.treasury + result.refund
    table.add_row("total", f"{format_usdc(total)} USDC", "= the deposit")
    console.print(table)
