"""Resource limits against hostile strangers and users, over real WebSockets.

Each test is an attack from docs/architecture.md's threat model: it asserts what the
attacker gets (refused, closed) and that an honest session on the same node is unharmed.
Nothing sleeps against the code under test: waits are on frames, with generous bounds.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import websockets
from eth_utils import keccak
from node_support import NodeFactory, NodeFrames, expect, serve_model
from process_support import NodeProcess
from test_billing import frames_until, login

from inferledger.chain.devchain import DevWorld
from inferledger.chain.units import usdc
from inferledger.inference import Backend, load_backend
from inferledger.sdk.wire import SessionClient
from support import open_session

HELLO = [{"role": "user", "content": "hello"}]
CAP = 8  # max_unreceipted_tokens: a hog's reply pauses after this many tokens
BOUND = 20.0  # seconds: the most any frame the test waits for may take on a loaded machine


async def _challenged(url: str, source: str = "127.0.0.1") -> Any:
    """A raw socket from ``source`` that got its challenge, never logging in."""
    ws = await websockets.connect(url, local_addr=(source, 0), open_timeout=BOUND)
    frame = json.loads(await asyncio.wait_for(ws.recv(), BOUND))
    assert frame["type"] == "challenge"
    return ws


async def _refusal(url: str, source: str = "127.0.0.1") -> tuple[str, int | None]:
    """Connect from ``source`` expecting to be refused: (error code, close code)."""
    async with websockets.connect(url, local_addr=(source, 0), open_timeout=BOUND) as ws:
        frame = json.loads(await asyncio.wait_for(ws.recv(), BOUND))
        assert frame["type"] == "error", frame
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), BOUND)
        return str(frame["code"]), ws.close_code


async def _honest_chat(world: DevWorld, url: str, session_id: int, key: bytes) -> int:
    """An honest user's whole session: log in, one reply, end. The tokens it got."""
    client = await SessionClient.connect(url, session_id, key, expect=expect(world))
    reply = await client.chat(HELLO, max_tokens=20)
    await client.end()
    await client.close()
    return len(reply.token_ids)


async def _hog(url: str, session_id: int, key: bytes) -> Any:
    """A user who asks for a long reply and never signs: its socket once the node has sent
    the most it sends unpaid (the reply is then paused, waiting for a receipt)."""
    ws, ready = await login(url, session_id, key)
    assert ready["type"] == "session_ready"
    prompt = {"type": "prompt", "request_id": "hog", "messages": HELLO, "max_tokens": 500}
    await ws.send(json.dumps(prompt))
    tokens = 0
    while tokens < CAP:
        tokens += sum(f["type"] == "token" for f in await frames_until(ws, "token"))
    return ws


def test_idle_unauthenticated_sockets_are_closed_at_the_login_deadline(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    model_id = serve_model(world, scripted, keccak(text="scripted"))
    session_id, signer = open_session(world, model_id=model_id)
    deadline = 1.0
    _, server = start_node(scripted, login_timeout=deadline)

    async def idle(opened: float) -> tuple[Any, float]:
        return await _challenged(server.ws_url), opened

    async def idle_until_closed(ws: Any, opened: float) -> tuple[str, float]:
        frame = json.loads(await asyncio.wait_for(ws.recv(), BOUND))
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), BOUND)
        return str(frame["code"]), time.monotonic() - opened

    async def run() -> tuple[list[tuple[str, float]], int]:
        sockets = [await idle(time.monotonic()) for _ in range(12)]  # under the address cap
        # One also pings: answered, but a ping is not a login.
        pinger = sockets[0][0]
        await pinger.send(json.dumps({"type": "ping"}))
        assert json.loads(await asyncio.wait_for(pinger.recv(), BOUND))["type"] == "pong"
        closed = await asyncio.gather(*(idle_until_closed(*pair) for pair in sockets))
        # After the deadline, an honest user who logs in within it is served in full.
        return closed, await _honest_chat(world, server.ws_url, session_id, signer.key)

    closed, honest_tokens = asyncio.run(asyncio.wait_for(run(), 120))
    assert {code for code, _ in closed} == {"LOGIN_TIMEOUT"}
    # Closed at the deadline, not before it (the bound above is how late is too late).
    assert min(after for _, after in closed) >= deadline * 0.9
    assert honest_tokens == 20


def test_connection_caps_refuse_a_flood_and_free_every_socket_that_ends(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    model_id = serve_model(world, scripted, keccak(text="scripted"))
    session_id, signer = open_session(world, model_id=model_id)
    _, server = start_node(scripted, max_connections=4, max_connections_per_ip=3, login_timeout=300)
    url, stranger_address = server.ws_url, "127.0.0.2"  # the honest user is on 127.0.0.1

    async def run() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        stranger = [await _challenged(url, stranger_address) for _ in range(3)]
        seen["per_address"] = await _refusal(url, stranger_address)
        honest = await SessionClient.connect(url, session_id, signer.key, expect=expect(world))
        seen["global"] = await _refusal(url, "127.0.0.3")
        seen["first_reply"] = len((await honest.chat(HELLO, max_tokens=10)).token_ids)
        # The stranger's sockets end three ways: a close, a fatal login error, a dropped TCP
        # connection. Each frees its place: three new ones from the same address are taken.
        await stranger[0].close()
        forged = {"session_id": 1, "nonce": "0x" + "00" * 32, "signature": "0x" + "00" * 65}
        forged["salt"] = "0x" + "11" * 32
        await stranger[1].send(json.dumps({"type": "session_init", **forged}))
        seen["fatal"] = json.loads(await asyncio.wait_for(stranger[1].recv(), BOUND))["code"]
        stranger[2].transport.abort()
        seen["again"] = len([await _retry_challenged(url, stranger_address) for _ in range(3)])
        seen["second_reply"] = len((await honest.chat(HELLO, max_tokens=10)).token_ids)
        await honest.end()
        await honest.close()
        return seen

    seen = asyncio.run(asyncio.wait_for(run(), 120))
    assert seen["per_address"] == ("TOO_MANY_CONNECTIONS", 1013)
    assert seen["global"] == ("TOO_MANY_CONNECTIONS", 1013)
    assert seen["fatal"] == "ENCRYPTION_REQUIRED"  # a plaintext login: refused, fatal
    assert seen["again"] == 3
    assert (seen["first_reply"], seen["second_reply"]) == (10, 10)


async def _retry_challenged(url: str, source: str) -> Any:
    """A challenged socket, retried while the node has not yet seen an old one end."""
    until = time.monotonic() + BOUND
    while True:
        try:
            return await _challenged(url, source)
        except AssertionError:
            if time.monotonic() > until:
                raise
        await asyncio.sleep(0.05)  # polling the node, not racing it: any delay works


async def _outcome(frames: NodeFrames) -> dict[str, Any]:
    """The frame that ends a prompt: its ``done`` or an ``error``."""
    while True:
        frame = await frames.next(BOUND)
        if frame["type"] in ("done", "error"):
            return dict(frame)


def test_a_paused_reply_gives_its_generation_slot_to_an_honest_user(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    model_id = serve_model(world, scripted, keccak(text="scripted"))
    hogs = [open_session(world, model_id=model_id) for _ in range(3)]
    honest_id, honest_signer = open_session(world, model_id=model_id)
    node, server = start_node(
        scripted,
        max_concurrent_generations=1,
        max_unreceipted_tokens=CAP,
        max_replies_per_depositor=4,
    )
    assert (
        node.settings.user_receipt_timeout >= 60
    )  # the old code made the honest user wait this long

    async def run() -> tuple[float, int]:
        sockets = [await _hog(server.ws_url, sid, signer.key) for sid, signer in hogs]
        client = await SessionClient.connect(
            server.ws_url, honest_id, honest_signer.key, expect=expect(world)
        )
        asked = time.monotonic()
        tokens = client.stream(HELLO, max_tokens=40)
        await asyncio.wait_for(anext(tokens), BOUND)
        first = time.monotonic() - asked
        count = 1 + len([t async for t in tokens])
        await client.end()
        await client.close()
        for ws in sockets:
            await ws.close()
        return first, count

    first, count = asyncio.run(asyncio.wait_for(run(), 120))
    print(f"first token after {first * 1000:.0f} ms with 3 paused hogs on 1 slot")
    assert first < 1.0
    assert count == 40  # the whole reply, receipts signed along the way


def test_a_depositor_gets_at_most_its_replies_in_flight(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    model_id = serve_model(world, scripted, keccak(text="scripted"))
    greedy = [open_session(world, model_id=model_id) for _ in range(3)]
    other = world.funded_sender("other-depositor", usdc("10"))
    honest_id, honest_signer = open_session(world, model_id=model_id, user=other)
    _, server = start_node(scripted, max_unreceipted_tokens=CAP, max_replies_per_depositor=2)

    async def run() -> tuple[str, int, int]:
        url = server.ws_url
        hogs = [await _hog(url, sid, signer.key) for sid, signer in greedy[:2]]
        third, ready = await login(url, greedy[2][0], greedy[2][1].key)
        assert ready["type"] == "session_ready"
        prompt = {"type": "prompt", "request_id": "3", "messages": HELLO, "max_tokens": 3}
        await third.send(json.dumps(prompt))
        refused = str((await _outcome(third))["code"])
        honest = await _honest_chat(world, url, honest_id, honest_signer.key)
        # One paused reply ends with its connection: the third session may prompt now.
        await hogs[0].close()
        until = time.monotonic() + BOUND
        while True:
            await third.send(json.dumps(prompt))
            last = await _outcome(third)
            if last["type"] == "done":
                break
            assert last["code"] == "TOO_MANY_REPLIES" and time.monotonic() < until, last
            await asyncio.sleep(0.05)  # polling until the node has seen the hog leave
        for ws in (hogs[1], third):
            await ws.close()
        return refused, honest, int(last["completion_tokens"])

    refused, honest, later = asyncio.run(asyncio.wait_for(run(), 120))
    assert refused == "TOO_MANY_REPLIES"
    assert honest == 20
    assert later == 3


def test_a_prompt_beyond_the_context_is_refused_before_it_is_billed(
    world: DevWorld, start_node: NodeFactory
) -> None:
    backend = load_backend("scripted", tokens_per_second=0)
    backend.context_length = 64  # type: ignore[attr-defined]
    model_id = serve_model(world, backend, keccak(text="scripted"))
    session_id, signer = open_session(world, model_id=model_id)
    _, server = start_node(backend)

    async def run() -> tuple[str, int, int]:
        client = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world)
        )
        long = [{"role": "user", "content": "x" * 100}]
        await client.send({"type": "prompt", "request_id": "long", "messages": long})
        refused = await frames_until(NodeFrames(client.ws), "error")
        assert not any(f["type"] == "reply_start" for f in refused)
        reply = await client.chat(HELLO, max_tokens=5)
        await client.end()
        await client.close()
        return str(refused[-1]["code"]), len(reply.token_ids), client.input_tokens

    code, tokens, billed = asyncio.run(asyncio.wait_for(run(), 120))
    assert code == "BAD_REQUEST"
    assert tokens == 5
    assert billed == len(backend.tokenize_chat(HELLO))  # only the prompt that was served


OVERSIZED_SENDER = """
import sys, threading
from websockets.sync.client import connect

url, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
codes = []

def send_one():
    with connect(url, max_size=2**20, open_timeout=20) as ws:
        ws.recv(timeout=20)  # the challenge
        try:
            ws.send("x" * size)
        except Exception:
            pass  # the node may drop the connection while the frame is still going out
        try:
            ws.recv(timeout=20)
        except Exception:
            pass
        codes.append(ws.close_code)

threads = [threading.Thread(target=send_one) for _ in range(count)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(" ".join(str(c) for c in codes))
"""


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def test_oversized_frames_from_another_process_are_not_buffered(
    world: DevWorld, scripted: Backend, tmp_path: Path
) -> None:
    if world.chain.is_embedded:
        pytest.skip("a node in its own process needs the chain over RPC")
    model_id = serve_model(world, scripted, keccak(text=scripted.name))
    sessions = [open_session(world, model_id=model_id) for _ in range(2)]
    node = NodeProcess(world, tmp_path)
    with node:  # __enter__ starts it (node.start() here would start a second one)
        assert node.process is not None
        url, pid = node.ws_url, node.process.pid
        # Warm up first (imports, the first session), so growth is what the frames cost.
        assert asyncio.run(_honest_chat(world, url, *_id_key(sessions[0]))) == 20
        before = _rss_bytes(pid)
        sent = subprocess.run(
            [sys.executable, "-c", OVERSIZED_SENDER, url, "8", str(15 * 2**20)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        grown = _rss_bytes(pid) - before
        honest = asyncio.run(_honest_chat(world, url, *_id_key(sessions[1])))
    print(f"node RSS grew by {grown / 2**20:.1f} MiB for 8 frames of 15 MiB")
    assert sent.stdout.split() == ["1009"] * 8  # closed: message too big
    assert grown < 20 * 2**20
    assert honest == 20


def _id_key(session: tuple[int, Any]) -> tuple[int, bytes]:
    session_id, signer = session
    return session_id, signer.key
