"""What the OpenAI gateway adds on top of the SDK: streamed tokens/s through each.

One node serves the scripted backend on loopback. The same streamed prompt is sent
through the SDK (``Session.stream``) and through the gateway with the official ``openai``
client (SSE), in alternating rounds, each over one session opened beforehand, so only
streaming is timed; the gateway is also read as bare SSE lines, which leaves out the
``openai`` client's own parsing (client, gateway, SDK and node share one process and
its GIL). Twice: at a model-like pace (``--pace`` tokens/s, 100 by default,
about SmolLM2 on a CPU core), where the target ratio is >= 0.95, and unthrottled, where
the ratio shows the gateway's own cost per token (HTTP, JSON, SSE) at its worst.

Run: ``python bench/gateway.py`` (quick) or ``python bench/gateway.py --full``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx
from eth_utils import keccak
from openai import AsyncOpenAI
from rich.console import Console
from rich.table import Table

from inferledger.chain.connect import connect
from inferledger.chain.devchain import INPUT_PRICE, PRICE, build_dev_world, dev_account
from inferledger.chain.units import usdc
from inferledger.config import load_settings
from inferledger.gateway import Gateway, GatewayServer
from inferledger.inference import load_backend
from inferledger.inference.scripted import ScriptedBackend
from inferledger.node.node import create_node
from inferledger.node.server import BackgroundServer
from inferledger.node.state import NodeState
from inferledger.sdk import Client, Session

QUESTION = [{"role": "user", "content": "Write a detailed story about a lighthouse keeper."}]


async def through_sdk(session: Session, tokens: int) -> float:
    start = time.perf_counter()
    count = sum([1 async for _ in session.stream(QUESTION, max_tokens=tokens)])
    return count / (time.perf_counter() - start)


async def through_gateway(api: AsyncOpenAI, model: str, tokens: int) -> float:
    start = time.perf_counter()
    stream = await api.chat.completions.create(
        model=model,
        messages=QUESTION,
        max_tokens=tokens,
        stream=True,  # type: ignore[arg-type]
    )
    count = sum([1 async for chunk in stream if chunk.choices and chunk.choices[0].delta.content])
    return count / (time.perf_counter() - start)


async def raw_sse(base_url: str, model: str, tokens: int) -> float:
    """The gateway read as bare SSE lines (no ``openai`` parsing): what the gateway costs."""
    body = {"model": model, "messages": QUESTION, "max_tokens": tokens, "stream": True}
    async with httpx.AsyncClient(timeout=120) as http:
        start = time.perf_counter()
        async with http.stream("POST", f"{base_url}/chat/completions", json=body) as response:
            count = sum([1 async for line in response.aiter_lines() if '"content": "' in line])
    return (count - 1) / (time.perf_counter() - start)  # not the role chunk's empty content


def compare(
    session: Session, base_url: str, model: str, tokens: int, rounds: int
) -> tuple[float, float, float]:
    """Mean tokens/s through the SDK, the gateway with ``openai``, and the gateway read as
    bare SSE, in alternating rounds."""

    async def run() -> tuple[float, float, float]:
        api = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
        direct, gateway, raw = [], [], []
        for _ in range(rounds):
            direct.append(await through_sdk(session, tokens))
            gateway.append(await through_gateway(api, model, tokens))
            raw.append(await raw_sse(base_url, model, tokens))
        return sum(direct) / rounds, sum(gateway) / rounds, sum(raw) / rounds

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="more rounds and longer replies")
    parser.add_argument("--pace", type=float, default=100.0, help="model-like tokens/s")
    args = parser.parse_args()
    rounds, tokens = (6, 400) if args.full else (2, 100)

    world = build_dev_world(connect(), host_stake=usdc("200"))  # 20 USDC sessions
    backend = load_backend("scripted", tokens_per_second=args.pace)
    assert isinstance(backend, ScriptedBackend)
    c = world.contracts
    model_id = c.models.approve_model(world.owner, backend.name, keccak(text="scripted"))
    c.nodes.set_models(world.host, {model_id: (INPUT_PRICE, PRICE)})
    home = Path(tempfile.mkdtemp())
    node = create_node(
        load_settings(host_key="0x" + dev_account("host").key.hex()),
        contracts=c,
        backend=backend,
        state=NodeState(home / "node.sqlite3"),
    )
    server = BackgroundServer(node).start()
    c.nodes.update_url(world.host, server.url)
    c.token.mint(world.owner, world.user.address, usdc("100"))

    def client(where: str) -> Client:
        key = "0x" + dev_account("user").key.hex()
        return Client(world.chain, key=key, deployment=c.deployment, sessions_dir=home / where)

    direct = client("sdk").sessions.open(world.host.address, model_id, usdc("20"))
    settings = load_settings(gateway_state_dir=home / "gateway", gateway_deposit="20")
    gateway = GatewayServer(Gateway(client("gateway/sessions"), settings)).start()
    compare(direct, gateway.url, backend.name, 5, 1)  # warm up: the gateway opens its session

    console = Console(width=120)
    table = Table(title=f"gateway vs SDK, streamed, {rounds} rounds x {tokens} tokens (loopback)")
    columns = (
        "backend",
        "SDK tok/s",
        "gateway+openai tok/s",
        "ratio",
        "gateway SSE tok/s",
        "ratio",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for label, pace in ((f"scripted at {args.pace:.0f} tok/s", args.pace), ("unthrottled", 0)):
        backend.tokens_per_second = pace
        with console.status(f"{label}..."):
            sdk, via_openai, via_sse = compare(direct, gateway.url, backend.name, tokens, rounds)
        table.add_row(
            label,
            f"{sdk:.0f}",
            f"{via_openai:.0f}",
            f"{via_openai / sdk:.3f}",
            f"{via_sse:.0f}",
            f"{via_sse / sdk:.3f}",
        )
    console.print(table)
    console.print("target: ratio >= 0.95 at a model's pace")
    direct.close()
    gateway.stop()
    server.stop()


if __name__ == "__main__":
    main()
