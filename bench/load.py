"""What one node process costs per streamed token, under many concurrent sessions.

Starts anvil, deploys, then runs the node (`inferledger node run`, scripted backend) in its
own process and load-generating clients in others (many end-to-end encrypted SDK sessions
per process, on asyncio). Every client opens its sessions on chain, logs in, and at one
signal all prompt at once; when every reply is in, all send `end` and wait until the node
has settled their sessions on chain. Prints, per run: the node process's CPU time (user +
system, from the OS, not wall time) per streamed token while streaming, and per session for
login and settlement; aggregate tokens/s; the p50/p99 gap between consecutive tokens as the
clients saw them (and the p99 time to the first token); the time from `end` until every
session is settled; and sessions settled / opened, read back from the chain.

Run: ``python bench/load.py`` (quick: 100 sessions x 40 tokens) or ``--full`` (100 and
1,000 sessions x 200 tokens). ``--sessions 100 1000 --tokens 200`` picks sizes by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

import httpx
import psutil
from eth_utils import keccak
from rich.console import Console
from rich.table import Table

from inferledger.chain.anvil import free_port, start_anvil
from inferledger.chain.connect import connect
from inferledger.chain.contracts import Contracts
from inferledger.chain.deployment import Deployment
from inferledger.chain.devchain import INPUT_PRICE, PRICE, build_dev_world, dev_account
from inferledger.chain.units import usdc
from inferledger.inference import load_backend
from inferledger.sdk.wire import Expectation, SessionClient

QUESTION = [{"role": "user", "content": "Write a detailed story about a lighthouse keeper."}]
DEPOSIT = usdc("1")  # 500 reply tokens at the dev price: more than any run streams
PROOF_INTERVAL = 100


@dataclass(frozen=True)
class Job:
    """What one load process does: open ``sessions`` sessions as ``label``, stream
    ``tokens`` tokens in each, end them all."""

    label: str
    chain_url: str
    deployment: str
    ws_url: str
    host: str
    sessions: int
    tokens: int


def _load_process(job: Job, ready: Any, go: EventType, settle: EventType) -> None:
    """A client process: open, log in, wait for ``go``, stream, wait for ``settle``, end."""
    try:
        chain = connect(job.chain_url)
        contracts = Contracts.attach(chain, Deployment.load(Path(job.deployment)))
        user = chain.sender(dev_account(job.label))
        market = contracts.marketplace
        contracts.token.approve(user, market.address, DEPOSIT * job.sessions)
        model_id = keccak(text=load_backend("scripted").name)
        opened = []
        for _ in range(job.sessions):
            signer = dev_account(f"{job.label}/signer/{len(opened)}")
            sid = market.create_session(
                user,
                host=job.host,
                model_id=model_id,
                deposit=DEPOSIT,
                max_input_price_per_mtok=INPUT_PRICE,
                max_output_price_per_mtok=PRICE,
                max_duration=86400,
                proof_interval=PROOF_INTERVAL,
                session_signer=signer.address,
            )
            opened.append((sid, signer.key))
        expect = Expectation(market.domain(), job.host)
        asyncio.run(_drive(job, opened, expect, ready, go, settle))
    except BaseException as exc:  # the parent reports it and stops the run
        ready.put(("failed", job.label, f"{type(exc).__name__}: {exc}"))
        raise


async def _drive(
    job: Job,
    opened: list[tuple[int, bytes]],
    expect: Expectation,
    ready: Any,
    go: EventType,
    settle: EventType,
) -> None:
    clients = []
    for sid, key in opened:  # one at a time: a login costs the node a chain read
        clients.append(
            await SessionClient.connect(job.ws_url, sid, key, expect=expect, open_timeout=120)
        )
    ready.put(("ready", job.label, [sid for sid, _ in opened]))
    await asyncio.to_thread(go.wait)

    async def stream(client: SessionClient) -> tuple[list[float], float, int]:
        start = time.perf_counter()
        arrivals = []
        async for _ in client.stream(QUESTION, max_tokens=job.tokens):
            arrivals.append(time.perf_counter())
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        first = arrivals[0] - start if arrivals else float("nan")
        return gaps, first, len(arrivals)

    results = await asyncio.gather(*(stream(c) for c in clients))
    gaps = [g for r in results for g in r[0]]
    ready.put(("streamed", job.label, (gaps, [r[1] for r in results], sum(r[2] for r in results))))
    await asyncio.to_thread(settle.wait)

    async def end(client: SessionClient) -> float:
        await client.end()
        frame = await client.wait_settlement(900)
        await client.close()
        return time.perf_counter() if frame is not None and frame.type == "settled" else -1.0

    ready.put(("settled", job.label, await asyncio.gather(*(end(c) for c in clients))))


@dataclass(frozen=True)
class NodeOptions:
    """How the node under load is set up: its prover, the scripted backend's pace (tokens/s
    per reply, 0: as fast as it can) and its receipt window (0: the default setting)."""

    prover: str = "commitment"
    rate: float = 0.0
    max_unreceipted: int = 0


class NodeRun:
    """`inferledger node run` for the world's host, with its state in ``directory``."""

    def __init__(
        self,
        chain_url: str,
        deployment: Path,
        directory: Path,
        sessions: int,
        profile: Path | None = None,
        options: NodeOptions = NodeOptions(),
    ) -> None:
        self.port = free_port()
        self.profile = profile
        self.log = directory / "node.log"
        self.env = {
            **os.environ,
            "INFERLEDGER_CHAIN_URL": chain_url,
            "INFERLEDGER_DEPLOYMENT_FILE": str(deployment),
            "INFERLEDGER_STATE_DB": str(directory / "node.sqlite3"),
            "INFERLEDGER_PROOF_STORE": str(directory / "proofs"),
            "INFERLEDGER_HOST_KEY": "0x" + dev_account("host").key.hex(),
            "INFERLEDGER_BACKEND": "scripted",
            "INFERLEDGER_PROVER": options.prover,
            # Every session is one depositor's on loopback: the per-client limits do not apply.
            "INFERLEDGER_MAX_CONNECTIONS": str(sessions + 64),
            "INFERLEDGER_MAX_CONNECTIONS_PER_IP": str(sessions + 64),
            "INFERLEDGER_MAX_REPLIES_PER_DEPOSITOR": str(sessions),
            "INFERLEDGER_MAX_CONCURRENT_GENERATIONS": str(sessions),
        }
        if options.rate:
            self.env["INFERLEDGER_SCRIPTED_TOKENS_PER_SECOND"] = str(options.rate)
        if options.max_unreceipted:
            self.env["INFERLEDGER_MAX_UNRECEIPTED_TOKENS"] = str(options.max_unreceipted)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def start(self) -> psutil.Process:
        command = [sys.executable, "-m", "inferledger.cli.main", "node", "run"]
        if self.profile is not None:  # the event loop's thread, under cProfile
            command[1:1] = ["-m", "cProfile", "-o", str(self.profile)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*command, "--port", str(self.port)], env=self.env, stdout=log, stderr=log
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).is_success:
                    return psutil.Process(self.process.pid)
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"the node did not start; its log:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # uvicorn re-raises the signal it stopped on: SIGINT lets cProfile write its file.
            self.process.send_signal(signal.SIGINT if self.profile else signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _sample(process: psutil.Process, out: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling the node's GIL holder (where its Python CPU goes) while it streams."""
    command = ["py-spy", "record", "--pid", str(process.pid), "--gil", "--threads"]
    return subprocess.Popen(
        [*command, "--rate", "200", "--format", "raw", "--output", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def thread_cpu(process: psutil.Process) -> dict[str, float]:
    """CPU seconds of the process's threads by kind (Linux only; empty elsewhere): the event
    loop's main thread, the generation pool, the to_thread pool, each named worker."""
    tick = os.sysconf("SC_CLK_TCK")
    kinds: dict[str, float] = {}
    for task in Path(f"/proc/{process.pid}/task").glob("*"):
        try:
            fields = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended
        name = fields.split("(", 1)[1].rsplit(")", 1)[0]
        if task.name == str(process.pid):
            name = "event loop"
        kind = name.rstrip("0123456789_").removeprefix("inferledger-") or name
        utime, stime = fields.rsplit(")", 1)[1].split()[11:13]
        kinds[kind] = kinds.get(kind, 0.0) + (int(utime) + int(stime)) / tick
    return kinds


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(
    chain_url: str,
    sessions: int,
    tokens: int,
    processes: int,
    profile: Path | None = None,
    options: NodeOptions = NodeOptions(),
    spy: Path | None = None,
) -> dict[str, float]:
    """One node, ``sessions`` sessions over ``processes`` client processes; its figures."""
    chain = connect(chain_url)
    directory = Path(tempfile.mkdtemp(prefix="inferledger-load-"))
    # A host's exposure (open deposits) is capped at half its stake.
    world = build_dev_world(chain, host_stake=2 * DEPOSIT * sessions + usdc("10"))
    backend = load_backend("scripted")
    c = world.contracts
    model_id = c.models.approve_model(world.owner, backend.name, keccak(text=backend.name))
    c.nodes.set_models(world.host, {model_id: (INPUT_PRICE, PRICE)})
    deployment = directory / "deployment.json"
    c.deployment.save(deployment)
    node = NodeRun(chain_url, deployment, directory, sessions, profile, options)
    process = node.start()

    context = mp.get_context("spawn")
    ready = context.Queue()
    go, settle = context.Event(), context.Event()
    shares = [sessions // processes + (i < sessions % processes) for i in range(processes)]
    jobs = []
    for i, share in enumerate(shares):
        label = f"load/{directory.name}/{i}"
        world.funded_sender(label, DEPOSIT * share)
        host = world.host.address
        jobs.append(Job(label, chain_url, str(deployment), node.ws_url, host, share, tokens))
    workers = [context.Process(target=_load_process, args=(j, ready, go, settle)) for j in jobs]
    try:
        for worker in workers:
            worker.start()
        login_cpu = cpu_seconds(process)

        def collect(kind: str) -> list[Any]:
            got = []
            while len(got) < len(workers):
                what, label, value = ready.get(timeout=1800)
                if what == "failed":
                    raise SystemExit(f"load process {label} failed: {value}")
                assert what == kind, (what, kind)
                got.append(value)
            return got

        opened = [sid for ids in collect("ready") for sid in ids]
        cpu0, t0, threads0 = cpu_seconds(process), time.perf_counter(), thread_cpu(process)
        login_cpu = cpu0 - login_cpu
        sampler = _sample(process, spy) if spy is not None else None
        go.set()
        streamed = collect("streamed")
        if sampler is not None:
            sampler.send_signal(signal.SIGINT)
            sampler.wait(timeout=60)
        cpu1, t1, threads1 = cpu_seconds(process), time.perf_counter(), thread_cpu(process)
        settle.set()
        settled_at = [t for times in collect("settled") for t in times]
        cpu2 = cpu_seconds(process)
        for worker in workers:
            worker.join(timeout=60)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
        node.stop()

    gaps = [g for r in streamed for g in r[0]]
    firsts = [f for r in streamed for f in r[1]]
    count = sum(r[2] for r in streamed)
    on_chain = sum(c.marketplace.get_session(sid).is_settled for sid in opened)
    return {
        "sessions": sessions,
        "tokens": count,
        "cpu_us_per_token": (cpu1 - cpu0) / max(count, 1) * 1e6,
        "tokens_per_s": count / (t1 - t0),
        **{
            f"thread:{kind}": (seconds - threads0.get(kind, 0.0)) / max(count, 1) * 1e6
            for kind, seconds in threads1.items()
        },
        "gap_p50_ms": percentile(gaps, 0.50) * 1e3,
        "gap_p99_ms": percentile(gaps, 0.99) * 1e3,
        "first_p99_ms": percentile(firsts, 0.99) * 1e3,
        "login_cpu_ms": login_cpu / sessions * 1e3,
        "settle_cpu_ms": (cpu2 - cpu1) / sessions * 1e3,
        "settle_s": (max(settled_at) - t1) if all(t > 0 for t in settled_at) else float("nan"),
        "settled_frames": sum(t > 0 for t in settled_at),
        "settled": on_chain,
        "opened": len(opened),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="100 and 1,000 sessions x 200 tokens")
    parser.add_argument("--sessions", type=int, nargs="+", help="concurrent sessions per run")
    parser.add_argument("--tokens", type=int, help="reply tokens per session")
    parser.add_argument("--processes", type=int, default=0, help="load processes (default: auto)")
    parser.add_argument(
        "--prover",
        default="commitment",
        help="the node's prover: commitment (default: bundles without activations, so the "
        "figures are the node's own) or auto (activation proofs over the scripted backend's "
        "pseudo-states, which it then computes for every token; bench/proofs.py measures "
        "proving)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="tokens/s of each reply (the scripted backend's pace); 0: as fast as it can",
    )
    parser.add_argument(
        "--max-unreceipted",
        type=int,
        default=0,
        help="the node's max_unreceipted_tokens (a receipt is asked every half of it); "
        "0: the default setting",
    )
    parser.add_argument(
        "--profile", type=Path, help="write the node's cProfile stats here (the last run's)"
    )
    parser.add_argument(
        "--spy",
        type=Path,
        help="write py-spy's samples of the node while it streams here (collapsed stacks; "
        "needs py-spy on PATH)",
    )
    args = parser.parse_args()
    sizes = args.sessions or ([100, 1000] if args.full else [100])
    tokens = args.tokens or (200 if args.full else 40)
    console = Console(width=120)
    results = []
    with start_anvil() as anvil:
        for sessions in sizes:
            processes = args.processes or max(2, min(4, sessions // 100))
            with console.status(f"{sessions} sessions x {tokens} tokens..."):
                figures = run(
                    anvil.url,
                    sessions,
                    tokens,
                    processes,
                    args.profile,
                    NodeOptions(args.prover, args.rate, args.max_unreceipted),
                    args.spy,
                )
                results.append(figures)
            console.print(results[-1])
    pace = f"{args.rate:g} tokens/s per reply" if args.rate else "as fast as it can"
    window = f", max_unreceipted_tokens {args.max_unreceipted}" if args.max_unreceipted else ""
    table = Table(
        title=f"one node process under load: scripted backend ({pace}), {tokens} tokens per "
        f"session, {args.prover} prover{window}"
    )
    table.add_column("measurement")
    for result in results:
        table.add_column(f"{result['sessions']:.0f} sessions", justify="right")

    def row(name: str, key: str, fmt: str) -> None:
        table.add_row(name, *(format(r[key], fmt) for r in results))

    row("node CPU per streamed token (us)", "cpu_us_per_token", ".1f")
    # Threads that did next to nothing in every run (idle pools) get no row.
    kinds = sorted(
        {k for r in results for k, v in r.items() if k.startswith("thread:") and v >= 0.1}
    )
    for key in kinds:
        table.add_row(
            f"  of which {key.removeprefix('thread:')} threads",
            *(format(r.get(key, 0.0), ".1f") for r in results),
        )
    # The OS counts each thread's CPU in whole ticks (10 ms), rounded down, so a pool of
    # many briefly busy threads (one generation thread per session) reads low per thread.
    table.add_row(
        "  of which unattributed (per-thread tick rounding)",
        *(
            format(r["cpu_us_per_token"] - sum(v for k, v in r.items() if k in kinds), ".1f")
            for r in results
        ),
    )
    row("aggregate tokens/s", "tokens_per_s", ".0f")
    row("gap between tokens, p50 (ms)", "gap_p50_ms", ".2f")
    row("gap between tokens, p99 (ms)", "gap_p99_ms", ".1f")
    row("time to first token, p99 (ms)", "first_p99_ms", ".0f")
    row("node CPU per session while opening + login (ms)", "login_cpu_ms", ".2f")
    row("node CPU per settlement (ms)", "settle_cpu_ms", ".2f")
    row("seconds from end until all settled", "settle_s", ".1f")
    table.add_row(
        "sessions settled on chain / opened",
        *(f"{r['settled']:.0f} / {r['opened']:.0f}" for r in results),
    )
    console.print(table)


if __name__ == "__main__":
    main()
