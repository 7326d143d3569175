"""Shared fixtures: each contract test runs on the embedded chain and on anvil.

The world (contracts, owner, host, user) is built once per chain; every test
runs inside a snapshot that is reverted afterwards, so tests never see each
other's state.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from inferledger.chain.anvil import start_anvil
from inferledger.chain.connect import Chain, connect
from inferledger.chain.devchain import DevWorld, build_dev_world

CHAIN_KINDS = ["embedded", "anvil"]


@pytest.fixture(scope="session")
def anvil_url() -> Iterator[str]:
    with start_anvil() as anvil:
        yield anvil.url


@pytest.fixture(scope="session", params=CHAIN_KINDS)
def chain(request: pytest.FixtureRequest) -> Chain:
    """The embedded py-evm chain, then anvil over JSON-RPC."""
    if request.param == "embedded":
        return connect()
    return connect(request.getfixturevalue("anvil_url"))


@pytest.fixture(scope="session")
def smollm() -> Iterator[object]:
    """The real SmolLM2 backend, loaded once. One torch thread keeps tests steady when
    xdist workers share the two cores."""
    from inferledger.inference.transformers_backend import TransformersBackend

    backend = TransformersBackend(num_threads=1)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def llama() -> Iterator[object]:
    """The same SmolLM2 GGUF in llama.cpp (the ``inferledger[llama]`` extra, which
    ``make test`` installs), loaded once: four sequences of 2,048 positions."""
    pytest.importorskip("llama_cpp", reason="the llama extra: bash scripts/llama-wheel.sh")
    from inferledger.inference.llama_cpp_backend import LlamaCppBackend

    backend = LlamaCppBackend(num_threads=1, sequences=4, context_length=2048)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def world_once(chain: Chain) -> DevWorld:
    return build_dev_world(chain)


@pytest.fixture
def world(world_once: DevWorld) -> Iterator[DevWorld]:
    """The dev world, reverted to its pristine state after the test."""
    snapshot = world_once.chain.snapshot()
    yield world_once
    world_once.chain.revert(snapshot)


_passed_by_chain: dict[str, int] = dict.fromkeys(CHAIN_KINDS, 0)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.passed:
        for kind in CHAIN_KINDS:
            if f"[{kind}" in report.nodeid:
                _passed_by_chain[kind] += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    counts = ", ".join(f"{kind}: {count} passed" for kind, count in _passed_by_chain.items())
    terminalreporter.write_line(f"chain tests by chain -- {counts}")
