"""Chain faults against a node in its own process, on anvil: a reorganisation that drops
the node's settlement (and rewinds its nonce), a close request made while the node was
down, and a chain that stops answering mid-settlement. The node shares nothing with the
test's chain connection, so it must find out from the chain itself.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
from eth_utils import keccak
from node_support import expect, read_session, serve_model, wait_until
from process_support import NodeProcess, needs_rpc
from test_node_settlement import (
    DEPOSIT,
    HELLO,
    INPUT_PRICE,
    PRICE,
    assert_paid_exactly,
    hello_tokens,
    open_priced,
)

from inferledger.chain.devchain import DevWorld
from inferledger.inference import Backend
from inferledger.protocol.server import SettlementPending
from inferledger.sdk.wire import SessionClient

FAST = {"chain_poll_interval": 0.2, "disconnect_grace": 1}


def _open_key(world: DevWorld, model_id: bytes) -> tuple[int, bytes]:
    session_id, signer = open_priced(world, model_id)
    return session_id, signer.key


async def _chat_and_end(world: DevWorld, node: NodeProcess, sid: int, key: bytes, n: int) -> str:
    client = await SessionClient.connect(node.ws_url, sid, key, expect=expect(world))
    await client.chat(HELLO, max_tokens=n)
    await client.end()
    frame = await client.wait_settlement(60)
    await client.close()
    return frame.type if frame else "nothing"


def test_a_reorg_that_drops_the_settlement_is_settled_again_and_the_nonce_heals(
    world: DevWorld, scripted: Backend, tmp_path: Path
) -> None:
    needs_rpc(world, "no node process can use it")
    model_id = serve_model(world, scripted, keccak(text=scripted.name), PRICE, INPUT_PRICE)
    first, first_key = _open_key(world, model_id)
    market = world.contracts.marketplace
    with NodeProcess(world, tmp_path, confirmations=3, **FAST) as node:
        before = world.chain.snapshot()
        assert asyncio.run(_chat_and_end(world, node, first, first_key, 150)) == "settled"
        assert market.get_session(first).is_settled
        world.chain.revert(before)  # the settlement and the host's nonce go back
        assert market.get_session(first).is_open

        # (a) the node notices within its confirmation depth and settles again in full.
        wait_until(lambda: market.get_session(first).is_settled, "the node to settle again", 60)
        assert_paid_exactly(world, first, hello_tokens(scripted), 150)
        for _ in range(3):
            world.chain.mine()
        wait_until(
            lambda: read_session(node.url, world, first, first_key).json()["settlement"][
                "confirmed"
            ],
            "the settlement to be confirmed",
            60,
        )

        # (b) the rewound nonce does not block the next session (no restart).
        second, second_key = _open_key(world, model_id)
        assert asyncio.run(_chat_and_end(world, node, second, second_key, 40)) == "settled"
        assert_paid_exactly(world, second, hello_tokens(scripted), 40)
    log = node.log.read_text()
    assert "settlement lost" in log and "settling it again" in log, log


def test_a_close_requested_while_the_node_was_down_is_settled_soon_after_it_restarts(
    world: DevWorld, scripted: Backend, tmp_path: Path
) -> None:
    needs_rpc(world, "no node process can use it")
    model_id = serve_model(world, scripted, keccak(text=scripted.name), PRICE, INPUT_PRICE)
    served, served_key = _open_key(world, model_id)
    never_served, _ = _open_key(world, model_id)
    market = world.contracts.marketplace
    # adopt_after=0: this host runs one node, so the session it never served is nobody's.
    node = NodeProcess(
        world, tmp_path, disconnect_grace=3600, chain_poll_interval=0.2, adopt_after=0
    )

    async def chat_and_leave() -> None:
        client = await SessionClient.connect(node.ws_url, served, served_key, expect=expect(world))
        await client.chat(HELLO, max_tokens=30)
        await client.close()  # no end: the node would wait an hour for the client

    with node:
        asyncio.run(chat_and_leave())
        wait_until(
            lambda: (
                read_session(node.url, world, served, served_key).json()["tokens_receipted"] == 30
            ),
            "the receipt on disk",
        )
    for session_id in (served, never_served):
        market.request_close(world.user, session_id)
    close_requested_at = world.chain.now()
    with node:
        started = time.monotonic()
        wait_until(
            lambda: (
                market.get_session(served).is_settled
                and market.get_session(never_served).is_settled
            ),
            "both sessions settled",
            60,
        )
        took = time.monotonic() - started
    assert_paid_exactly(world, served, hello_tokens(scripted), 30)
    assert_paid_exactly(world, never_served, 0, 0)
    # By the host, within seconds, not by a finalize after the close window.
    assert world.chain.now() < close_requested_at + market.close_window()
    assert took < 60


def test_a_chain_that_stops_answering_mid_settlement_degrades_health_then_settles(
    scripted: Backend, tmp_path: Path
) -> None:
    """anvil stopped (SIGSTOP) while the node settles: /health says degraded and why; after
    SIGCONT the node settles, the SDK's close() returns that settlement (no close request)
    and the user's local record says settled."""
    from inferledger.chain.anvil import start_anvil
    from inferledger.chain.connect import connect
    from inferledger.chain.devchain import build_dev_world, dev_account
    from inferledger.sdk import Client

    with start_anvil() as anvil:
        world = build_dev_world(connect(anvil.url))
        model_id = serve_model(world, scripted, keccak(text=scripted.name), PRICE, INPUT_PRICE)
        with NodeProcess(world, tmp_path, settlement_wait=1, **FAST) as node:
            client = Client(
                connect(anvil.url),
                key="0x" + dev_account("user").key.hex(),
                deployment=world.contracts.deployment,
                sessions_dir=tmp_path / "sessions",
            )
            session = client.sessions.open(world.host.address, model_id, DEPOSIT, url=node.ws_url)
            session.chat_sync(HELLO, max_tokens=60)
            pending: list[str] = []

            def stopped_until_health_says_so(frame: SettlementPending) -> None:
                pending.append(frame.reason)
                if len(pending) == 1:
                    try:
                        wait_until(
                            lambda: _degraded(node), "/health to say the chain does not answer", 90
                        )
                    finally:
                        anvil.process.send_signal(signal.SIGCONT)

            anvil.process.send_signal(signal.SIGSTOP)
            try:
                settlement = session.close(on_pending=stopped_until_health_says_so)
            finally:
                anvil.process.send_signal(signal.SIGCONT)
            assert pending, "the node never said settlement_pending"
            assert settlement.status == "settled", settlement
            assert (settlement.input_tokens, settlement.output_tokens) == (
                hello_tokens(scripted),
                60,
            )
            wait_until(
                lambda: httpx.get(node.url + "/health", timeout=5).status_code == 200,
                "/health to recover",
                60,
            )
        info = world.contracts.marketplace.get_session(session.id)
        assert info.close_requested_at == 0  # the SDK waited for the node instead
        assert_paid_exactly(world, session.id, hello_tokens(scripted), 60)
        record = client.sessions.refresh(session.id)
        assert record.settlement is not None and record.settlement["status"] == "settled"


def _degraded(node: NodeProcess) -> bool:
    response = httpx.get(node.url + "/health", timeout=5)
    body = response.json()
    return (
        response.status_code == 503
        and body["status"] == "degraded"
        and any("the chain RPC does not answer" in p for p in body["problems"])
    )
