"""docs/troubleshooting.md must match the code: a section per preflight check, and every
prover failure the preflight can report."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from inferledger.node.preflight import _CHECKS
from inferledger.proofs.provers import ExternalProver, ProverUnavailable, make_prover

DOC = (Path(__file__).resolve().parents[2] / "docs" / "troubleshooting.md").read_text()


def test_every_preflight_check_has_a_section() -> None:
    sections = set(re.findall(r"^## (\w+)$", DOC, re.MULTILINE))
    assert {name for name, _ in _CHECKS} <= sections


def _unavailable(tmp_path: Path, case: str) -> ProverUnavailable:
    path = tmp_path / "prover"
    if case == "not_file":
        path.mkdir()
    elif case == "not_executable":
        path.write_text("#!/bin/sh\n")
    elif case == "handshake":
        path.write_text("#!/bin/sh\necho nonsense\n")
        path.chmod(0o755)
    makers = {
        "no_path": lambda: make_prover("external", dev_chain=True, hidden_states=True),
        "no_hidden": lambda: make_prover("activation", dev_chain=True, hidden_states=False),
        "mock": lambda: make_prover("mock", dev_chain=False, hidden_states=True),
    }
    with pytest.raises(ProverUnavailable) as raised:
        if case in makers:
            makers[case]()
        else:
            ExternalProver(path, timeout=5).preflight()
    return raised.value


@pytest.mark.parametrize(
    "case",
    [
        "no_path",
        "no_hidden",
        "mock",
        "unknown",
        "missing",
        "not_file",
        "not_executable",
        "handshake",
    ],
)
def test_every_prover_failure_is_documented(tmp_path: Path, case: str) -> None:
    error = _unavailable(tmp_path, case)
    documented = error.detail.replace(str(tmp_path / "prover"), "PATH")
    documented = documented.split(": handshake failed")[0]
    assert f"prover '{error.prover}': {documented}" in DOC, documented
    assert error.setting in DOC
