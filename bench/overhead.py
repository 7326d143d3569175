"""What the node adds on top of the model: throughput ratio and per-token overhead.

Part 1 (SmolLM2): tokens/s of the backend alone, then through node + WebSocket +
receipts, same prompt, seed and token count, alternating runs; prints the ratio.
Part 2 (scripted backend, no model cost): one session's tokens/s end-to-end encrypted
vs plaintext (alternating runs; the protocol's cost with nothing to hide it), then N
concurrent (encrypted) sessions on one node, and the node's wall time per streamed token
in microseconds.

Run: ``python bench/overhead.py [--sessions 100] [--tokens 120]``. All traffic is on
loopback; figures are ratios of runs made in this one process.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from eth_utils import keccak
from rich.console import Console
from rich.table import Table

from inferledger.chain.connect import connect
from inferledger.chain.devchain import (
    INPUT_PRICE,
    PRICE,
    DevWorld,
    build_dev_world,
    dev_account,
    open_session,
)
from inferledger.config import load_settings
from inferledger.inference import Backend, GenerationParams, Token, load_backend
from inferledger.node.node import create_node
from inferledger.node.server import BackgroundServer
from inferledger.node.state import NodeState
from inferledger.sdk.wire import Expectation, SessionClient

QUESTION = [{"role": "user", "content": "Write a detailed story about a lighthouse keeper."}]


def serve(
    world: DevWorld, backend: Backend, sha256: bytes, slots: int, plaintext: bool = False
) -> BackgroundServer:
    c = world.contracts
    model_id = c.models.approve_model(world.owner, backend.name, sha256)
    c.nodes.set_models(world.host, {model_id: (INPUT_PRICE, PRICE)})
    settings = load_settings(
        host_key="0x" + dev_account("host").key.hex(),
        max_concurrent_generations=slots,
        # One depositor on loopback runs every session: the per-client limits do not apply.
        max_connections=max(slots, 256),
        max_connections_per_ip=slots,
        max_replies_per_depositor=slots,
        allow_plaintext_sessions=plaintext,  # for the comparison: the embedded chain is dev
    )
    state = NodeState(Path(tempfile.mkdtemp()) / "node.sqlite3")
    node = create_node(settings, contracts=c, backend=backend, state=state)
    if not node.ready:
        raise SystemExit("\n".join(node.preflight.lines()))
    return BackgroundServer(node).start()


def backend_alone(backend: Backend, tokens: int) -> float:
    params = GenerationParams(max_tokens=tokens, temperature=0, seed=1)
    start = time.perf_counter()
    count = sum(isinstance(e, Token) for e in backend.generate(QUESTION, params))
    return count / (time.perf_counter() - start)


def expect(world: DevWorld) -> Expectation:
    return Expectation(world.contracts.marketplace.domain(), world.host.address)


async def through_node(
    url: str,
    session_id: int,
    key: bytes,
    tokens: int,
    expected: Expectation,
    plaintext: bool = False,
) -> float:
    client = await SessionClient.connect(
        url, session_id, key, expect=expected, plaintext=plaintext, max_size=2**22
    )
    start = time.perf_counter()
    reply = await client.chat(QUESTION, max_tokens=tokens, temperature=0, seed=1)
    elapsed = time.perf_counter() - start
    await client.end()
    await client.wait_settlement(60)  # let the node settle before the server stops
    return len(reply.token_ids) / elapsed


def model_overhead(world: DevWorld, tokens: int, rounds: int) -> tuple[float, float]:
    from inferledger.inference.transformers_backend import TransformersBackend

    backend = TransformersBackend(num_threads=1)
    server = serve(world, backend, bytes.fromhex(backend.weights_sha256), slots=1)
    model_id = keccak(text=backend.name)
    alone, served = [], []
    backend_alone(backend, 8)  # warm up
    for _ in range(rounds):
        session_id, signer = open_session(world, model_id=model_id, proof_interval=50)
        alone.append(backend_alone(backend, tokens))
        served.append(
            asyncio.run(through_node(server.ws_url, session_id, signer.key, tokens, expect(world)))
        )
    server.stop()
    return sum(alone) / rounds, sum(served) / rounds


def encryption_cost(
    world: DevWorld, server: BackgroundServer, model_id: bytes, tokens: int, rounds: int
) -> tuple[float, float, float]:
    """One session's tokens/s, sealed and plaintext, in alternating pairs: the medians
    (encrypted, plain), and the median of the pairs' ratios (a busy machine slows both
    runs of a pair alike, so the ratio is steadier than either rate)."""
    rates: dict[bool, list[float]] = {False: [], True: []}

    def run(plaintext: bool) -> float:
        session_id, signer = open_session(world, model_id=model_id, proof_interval=50)
        rate = through_node(server.ws_url, session_id, signer.key, tokens, expect(world), plaintext)
        return asyncio.run(rate)

    run(False), run(True)  # warm up both paths, not counted
    for pair in range(rounds):
        # Each pair in the other order: a machine getting busier or quieter favours neither.
        for plaintext in (False, True) if pair % 2 == 0 else (True, False):
            rates[plaintext].append(run(plaintext))
    ratios = [sealed / plain for sealed, plain in zip(rates[False], rates[True], strict=True)]
    return (
        statistics.median(rates[False]),
        statistics.median(rates[True]),
        statistics.median(ratios),
    )


def concurrency(
    world: DevWorld, sessions: int, tokens: int, rounds: int
) -> tuple[dict[str, float], tuple[float, float, float]]:
    """Stream ``tokens`` to each of ``sessions`` clients at once (receipts and proofs every
    50 tokens), then end them all and wait until the node has settled every one on chain.
    First, on the same node, ``encryption_cost`` over ``rounds``."""
    backend = load_backend("scripted", tokens_per_second=0)
    server = serve(world, backend, keccak(text="scripted"), slots=sessions, plaintext=True)
    model_id = keccak(text=backend.name)
    sealed = encryption_cost(world, server, model_id, tokens * 5, rounds)
    opened = [open_session(world, model_id=model_id, proof_interval=50) for _ in range(sessions)]

    params = GenerationParams(max_tokens=tokens, temperature=0)
    start = time.perf_counter()
    for _ in range(sessions):
        sum(1 for _ in backend.generate(QUESTION, params))
    backend_per_token = (time.perf_counter() - start) / (sessions * tokens)

    async def run() -> dict[str, float]:
        clients = [
            await SessionClient.connect(
                server.ws_url, sid, signer.key, expect=expect(world), max_size=2**22
            )
            for sid, signer in opened
        ]
        start = time.perf_counter()
        replies = await asyncio.gather(*(c.chat(QUESTION, max_tokens=tokens) for c in clients))
        streamed = time.perf_counter() - start
        count = sum(len(r.token_ids) for r in replies)

        async def settle(client: SessionClient) -> bool:
            await client.end()
            frame = await client.wait_settlement(600)
            return frame is not None and frame.type == "settled"

        start = time.perf_counter()
        settled = await asyncio.gather(*(settle(c) for c in clients))
        return {
            "tokens": count,
            "per_token_us": streamed / count * 1e6,
            "settled": sum(settled),
            "settle_s": time.perf_counter() - start,
        }

    result = asyncio.run(run())
    server.stop()
    return {**result, "backend_us": backend_per_token * 1e6}, sealed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=120, help="tokens per SmolLM2 reply")
    parser.add_argument("--rounds", type=int, default=2, help="alternating SmolLM2 runs")
    parser.add_argument("--sessions", type=int, default=100, help="concurrent scripted sessions")
    parser.add_argument("--session-tokens", type=int, default=200, help="tokens per session")
    parser.add_argument("--skip-model", action="store_true", help="only the scripted part")
    args = parser.parse_args()
    console = Console(width=110)
    opened = args.sessions + 2 * max(args.rounds, 5) + 2
    # 2 USDC each, some phases open more than counted here; the cap is half the stake.
    world = build_dev_world(connect(), host_stake=opened * 16_000_000)
    for i in range(opened):  # USDC for every session below
        world.contracts.token.mint(world.owner, world.user.address, 2_000_000)
        del i

    table = Table(title="node overhead (one run, loopback)")
    table.add_column("measurement")
    table.add_column("value", justify="right")
    if not args.skip_model:
        with console.status("SmolLM2: backend alone vs through the node..."):
            alone, served = model_overhead(world, args.tokens, args.rounds)
        table.add_row("SmolLM2 backend alone (tokens/s)", f"{alone:.1f}")
        table.add_row("SmolLM2 via node + WebSocket + receipts (tokens/s)", f"{served:.1f}")
        table.add_row("ratio (target >= 0.95)", f"{served / alone:.3f}")
    with console.status(f"scripted: encrypted vs plain, then {args.sessions} sessions..."):
        load, (encrypted, plain, ratio) = concurrency(
            world, args.sessions, args.session_tokens, max(args.rounds, 5)
        )
    table.add_row("scripted: one session, plaintext (tokens/s, median)", f"{plain:.0f}")
    table.add_row("scripted: one session, end-to-end encrypted (tokens/s)", f"{encrypted:.0f}")
    table.add_row("encrypted / plaintext, median of pairs (target >= 0.95)", f"{ratio:.3f}")
    table.add_row(
        "scripted: sessions at once / tokens streamed", f"{args.sessions} / {load['tokens']}"
    )
    table.add_row(
        "scripted: node wall time per token (us), receipts + proofs", f"{load['per_token_us']:.1f}"
    )
    table.add_row("scripted: backend alone per token (us)", f"{load['backend_us']:.1f}")
    table.add_row(
        "scripted: sessions settled on chain / seconds for all",
        f"{load['settled']:.0f} / {load['settle_s']:.1f}",
    )
    console.print(table)


if __name__ == "__main__":
    main()
