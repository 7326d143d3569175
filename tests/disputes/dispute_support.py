"""The dispute world: a SmolLM2 host node, a user who can challenge, and staked jurors.

Jurors run in this process on the embedded chain (a chain that lives in one process), and
as `inferledger verifier run` processes on anvil. Hosts that cheat are backend wrappers:
one serves with noise on its weights, one edits a token after choosing it, one streams
text it never generated and proves it by a prefill.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from eth_utils import keccak

from inferledger.chain.anvil import free_port
from inferledger.chain.devchain import DevWorld, dev_account
from inferledger.chain.tx import TxSender
from inferledger.chain.units import usdc
from inferledger.config import load_settings
from inferledger.inference import load_backend
from inferledger.inference.base import Finish, GenerationParams, Hidden, Token
from inferledger.node.node import create_node
from inferledger.node.server import BackgroundServer
from inferledger.node.state import NodeState
from inferledger.sdk import Client, SessionRecord, lifecycle
from inferledger.verifier.service import VerifierService, create_app

STAKE = usdc("20")


def stake_verifier(world: DevWorld, label: str, url: str) -> TxSender:
    """A funded verifier account registered at ``url`` with ``STAKE``."""
    sender = world.funded_sender(label, STAKE)
    c = world.contracts
    c.token.approve(sender, c.verifiers.address, STAKE)
    c.verifiers.register(sender, url, STAKE)
    return sender


@dataclass
class InProcessJury:
    """Jurors in this process, each its own service and HTTP server on loopback."""

    services: list[VerifierService] = field(default_factory=list)
    servers: list[BackgroundServer] = field(default_factory=list)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def start_in_process_jury(world: DevWorld, model: Any, count: int) -> InProcessJury:
    jury = InProcessJury()
    for i in range(count):
        label = f"verifier-{i}"
        account = dev_account(label)
        # The URL is known once the server listens; registration follows.
        placeholder = world.funded_sender(label)
        service = VerifierService(
            world.contracts, placeholder, model, private_key=bytes(account.key), poll_interval=0.1
        )
        server = BackgroundServer(app=create_app(service)).start()
        stake_verifier(world, label, server.url)
        jury.services.append(service)
        jury.servers.append(server)
    return jury


@dataclass
class ProcessJury:
    """Jurors as `inferledger verifier run` processes, one per port."""

    processes: dict[str, subprocess.Popen[bytes]]
    logs: dict[str, Path]

    def stop(self, address: str | None = None) -> None:
        for who, process in self.processes.items():
            if address is None or who.lower() == address.lower():
                process.terminate()
                process.wait(timeout=30)

    def log_of(self, address: str) -> str:
        return self.logs[address].read_text(errors="replace")


def start_process_jury(
    world: DevWorld, deployment_file: Path, count: int, tmp: Path
) -> ProcessJury:
    processes, logs = {}, {}
    for i in range(count):
        label = f"verifier-p{i}"
        port = free_port()
        sender = stake_verifier(world, label, f"http://127.0.0.1:{port}")
        env = {
            **os.environ,
            "INFERLEDGER_VERIFIER_KEY": "0x" + dev_account(label).key.hex(),
            "INFERLEDGER_CHAIN_URL": world.chain.url,
            "INFERLEDGER_DEPLOYMENT_FILE": str(deployment_file),
            "INFERLEDGER_VERIFIER_POLL_INTERVAL": "0.2",
        }
        log = tmp / f"{label}.log"
        processes[sender.address] = subprocess.Popen(
            [sys.executable, "-m", "inferledger.cli.main", "verifier", "run", "--port", str(port)],
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        logs[sender.address] = log
    jury = ProcessJury(processes, logs)
    deadline = time.monotonic() + 300  # each loads SmolLM2
    for who, process in processes.items():
        url = world.contracts.verifiers.get_verifier(who).url
        while True:
            if process.poll() is not None:
                raise AssertionError(f"verifier {who} exited: {jury.log_of(who)[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"verifier {who} did not start: {jury.log_of(who)[-2000:]}")
            time.sleep(0.5)
    return jury


# Hosts that cheat -----------------------------------------------------------------------


class EditingBackend:
    """The real model, but the host swaps reply token ``at`` for another after choosing
    it (an edit it then proves with the rows of what it really computed)."""

    def __init__(self, inner: Any, at: int = 5) -> None:
        self._inner, self._at = inner, at

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def generate(self, messages: Any, params: GenerationParams, **options: Any) -> Iterator[Any]:
        produced = 0
        for event in self._inner.generate(messages, params, **options):
            if isinstance(event, Token):
                if produced == self._at:
                    other = event.token_id + 1
                    event = Token(other, self._inner.decode([other]))
                produced += 1
            yield event


class PrefillForgingBackend:
    """Streams a text it never sampled (the model's own words for another question) and
    proves it with a prefill over exactly those tokens: the activations match, the token
    choices do not."""

    def __init__(self, inner: Any, forged: Sequence[int]) -> None:
        self._inner, self._forged = inner, list(forged)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def generate(self, messages: Any, params: GenerationParams, **options: Any) -> Iterator[Any]:
        prompt = list(self._inner.tokenize_chat(messages))
        forged = self._forged[: params.max_tokens]
        rows = np.asarray(self._inner.prefill_hidden_states([*prompt, *forged]))
        capture = options.get("capture_hidden_states", False)
        if capture:
            yield Hidden(0, rows[: len(prompt)])
        for i, token_id in enumerate(forged):
            yield Token(token_id, self._inner.decode([token_id]))
            if capture:
                yield Hidden(len(prompt) + i, rows[len(prompt) + i : len(prompt) + i + 1])
        yield Finish(reason="length", prompt_tokens=len(prompt))


# Sessions -------------------------------------------------------------------------------


@contextmanager
def host_node(world: DevWorld, backend: Any, tmp: Path) -> Iterator[BackgroundServer]:
    """The world's host serving ``backend`` with activation proofs, on loopback."""
    settings = load_settings(
        host_key="0x" + dev_account("host").key.hex(),
        chain_url=world.chain.url,
        state_db=tmp / "node.sqlite3",
        proof_store=tmp / "proofs",
        prover="activation",
    )
    node = create_node(
        settings, contracts=world.contracts, backend=backend, state=NodeState(tmp / "node.sqlite3")
    )
    server = BackgroundServer(node).start()
    try:
        world.contracts.nodes.update_url(world.host, server.url)
        yield server
    finally:
        for open_session in lifecycle.open_sessions():
            lifecycle.unregister(open_session)
        server.stop()


def run_session(
    client: Client,
    world: DevWorld,
    model_id: bytes,
    questions: Sequence[str],
    max_tokens: int,
    proof_interval: int = 10,
    during: Callable[[], Any] | None = None,
) -> SessionRecord:
    """One settled session asking ``questions`` in turn; ``during`` wraps the chat (e.g.
    noise on the weights while the host serves)."""
    with client.sessions.open(
        world.host.address, model_id, usdc("2"), proof_interval=proof_interval
    ) as session:
        messages: list[dict[str, str]] = []
        with during() if during else _nothing():
            for question in questions:
                messages.append({"role": "user", "content": question})
                reply = session.chat_sync(messages, max_tokens=max_tokens, temperature=0)
                messages.append({"role": "assistant", "content": reply.text})
    assert session.settlement is not None and session.settlement.settled
    return session.record


@contextmanager
def _nothing() -> Iterator[None]:
    yield


# The scripted backend (fast) --------------------------------------------------------

SCRIPTED = load_backend("scripted", tokens_per_second=0, hidden_size=64)


class CheatingScripted:
    """The scripted model, but every hidden state the host proves is nudged: another model."""

    def __init__(self) -> None:
        self._inner = load_backend("scripted", tokens_per_second=0, hidden_size=64)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def generate(self, messages: Any, params: Any, **options: Any) -> Iterator[Any]:
        for event in self._inner.generate(messages, params, **options):
            if isinstance(event, Hidden):
                event = Hidden(event.start, event.rows * np.float32(1.01))
            yield event


def scripted_clients(world: DevWorld, tmp: Path) -> tuple[Client, Client]:
    """The world's user, and a challenger funded for its bonds."""
    world.funded_sender("challenger", usdc("50"))
    made = []
    for label in ("user", "challenger"):
        made.append(
            Client(
                world.chain,
                key="0x" + dev_account(label).key.hex(),
                deployment=world.contracts.deployment,
                sessions_dir=tmp / label,
            )
        )
    return made[0], made[1]


@contextmanager
def scripted_session(
    world: DevWorld, user: Client, backend: Any, tmp: Path
) -> Iterator[SessionRecord]:
    """A settled session on ``backend``, with a node that keeps serving its proofs while
    this lasts."""
    c = world.contracts
    model_id = c.models.approve_model(world.owner, SCRIPTED.name, keccak(text="scripted"))
    c.nodes.set_models(world.host, {model_id: (0, 2_000_000)})
    with host_node(world, backend, tmp):
        host = world.host.address
        with user.sessions.open(host, model_id, usdc("1"), proof_interval=10) as session:
            session.chat_sync([{"role": "user", "content": "Hello"}], max_tokens=20)
        assert session.settlement is not None and session.settlement.settled
        yield session.record
