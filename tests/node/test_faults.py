"""Faults that need a JSON-RPC chain (anvil): the RPC going away, and a node killed with -9.

The embedded chain lives inside the node's process, so neither fault exists there.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from eth_utils import keccak
from node_support import NodeFactory, expect, read_session, serve_model, wait_until
from process_support import NodeProcess, needs_rpc
from test_node_settlement import (
    HELLO,
    INPUT_PRICE,
    PRICE,
    assert_paid_exactly,
    hello_tokens,
    open_priced,
)

from inferledger.chain.anvil import free_port
from inferledger.chain.connect import connect
from inferledger.chain.contracts import Contracts
from inferledger.chain.devchain import DevWorld
from inferledger.inference import Backend
from inferledger.protocol.server import Settled, SettlementPending
from inferledger.sdk.wire import SessionClient

CLI = [sys.executable, "-m", "inferledger.cli.main"]


class TcpProxy:
    """Forwards 127.0.0.1:port to a target; ``cut()`` drops every connection and refuses
    new ones until ``restore()``: an RPC endpoint going down and coming back."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._links: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.restore()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port), reuse_port=True)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        assert self._listener is not None
        # shutdown, not only close: on Linux a socket closed while another thread blocks in
        # accept() keeps listening (and accepting) until that accept returns.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for link in self._links:
            link.close()
        self._links.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._links += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                s.close()


def test_rpc_unreachable_during_settlement_then_back(
    world: DevWorld, scripted: Backend, start_node: NodeFactory
) -> None:
    needs_rpc(world, "no RPC to lose, no node to kill")
    host, port = world.chain.url.removeprefix("http://").split(":")
    proxy = TcpProxy((host, int(port)))
    chain = connect(proxy.url, receipt_timeout=5)
    contracts = Contracts.attach(chain, world.contracts.deployment)
    model_id = serve_model(world, scripted, keccak(text=scripted.name), PRICE, INPUT_PRICE)
    session_id, signer = open_priced(world, model_id)
    node, server = start_node(scripted, contracts=contracts, settlement_wait=1.0)
    market = world.contracts.marketplace
    seen: list[tuple[SettlementPending, bool, str]] = []

    def failed_attempt() -> str:
        settlement = node.outbox.settlement(session_id)
        return settlement.last_error or "" if settlement and settlement.attempts else ""

    def hear_out_then_restore(frame: SettlementPending) -> None:
        """At the node's first settlement_pending: note what stands, bring the RPC back."""
        if not seen:
            wait_until(failed_attempt, "a failed settlement attempt")
            seen.append((frame, market.get_session(session_id).is_settled, failed_attempt()))
            proxy.restore()

    async def run() -> Settled | SettlementPending | None:
        client = await SessionClient.connect(
            server.ws_url, session_id, signer.key, expect=expect(world)
        )
        await client.chat(HELLO, max_tokens=120)
        proxy.cut()
        await client.end()
        final = await client.wait_settlement(120, on_pending=hear_out_then_restore)
        await client.close()
        return final

    final = asyncio.run(run())
    (pending, settled_then, error), *_ = seen
    assert pending.session_id == session_id and pending.reason
    assert not settled_then  # pending meant it: nothing had landed
    assert "ChainUnreachable" in error or "cannot reach" in error, error
    # The same connection then hears the settlement once the RPC is back.
    assert isinstance(final, Settled), final
    assert (final.input_tokens, final.output_tokens) == (hello_tokens(scripted), 120)
    assert_paid_exactly(world, session_id, hello_tokens(scripted), 120)


def test_node_killed_mid_session_settles_from_its_sqlite_state_after_restart(
    world: DevWorld, scripted: Backend, tmp_path: Path
) -> None:
    needs_rpc(world, "no RPC to lose, no node to kill")
    model_id = serve_model(world, scripted, keccak(text=scripted.name), PRICE, INPUT_PRICE)
    session_id, signer = open_priced(world, model_id)
    node = NodeProcess(world, tmp_path, disconnect_grace=1)

    def receipted_on_disk(tokens: int) -> None:
        for _ in range(300):
            if (
                read_session(node.url, world, session_id, signer.key).json()["tokens_receipted"]
                >= tokens
            ):
                return
            time.sleep(0.1)
        raise AssertionError(f"the node never stored the receipt for {tokens} tokens")

    async def chat() -> None:
        client = await SessionClient.connect(
            node.ws_url, session_id, signer.key, expect=expect(world)
        )
        await client.chat(HELLO, max_tokens=150)
        # The reply's last receipt was sent before its done frame; kill once it is on disk.
        await asyncio.to_thread(receipted_on_disk, 150)
        node.stop(signal.SIGKILL)

    with node.start():
        asyncio.run(chat())
    assert world.contracts.marketplace.get_session(session_id).is_open

    with node.start():
        for _ in range(300):
            if world.contracts.marketplace.get_session(session_id).is_settled:
                break
            time.sleep(0.1)
        status = read_session(node.url, world, session_id, signer.key).json()
    billed = hello_tokens(scripted)
    assert_paid_exactly(world, session_id, billed, 150)
    assert status["settlement"]["reason"] == "restart"
    assert (status["settlement"]["input_tokens"], status["settlement"]["tokens"]) == (billed, 150)
    assert [c["tokens"] for c in status["checkpoints"]] == [[0, 100], [100, 150]]
