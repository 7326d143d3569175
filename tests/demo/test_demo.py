"""The README's first command: `inferledger demo`, end to end with the real SmolLM2."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
from rich.console import Console

from inferledger.chain.anvil import start_anvil
from inferledger.cli.demo import DemoResult, run_demo
from inferledger.config import load_settings


@pytest.fixture(params=["embedded", "anvil"])
def chain_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The embedded chain, then a fresh anvil of its own (as `--rpc` would use)."""
    if request.param == "embedded":
        yield "embedded"
        return
    with start_anvil() as anvil:
        yield anvil.url


@pytest.mark.slow
def test_demo_reproduces_the_seed_table_with_proofs_that_verify(chain_url: str) -> None:
    out = io.StringIO()
    result: DemoResult = run_demo(
        load_settings(chain_url=chain_url), console=Console(file=out, width=160)
    )

    assert result.tokens == 200
    assert (result.host_earnings, result.treasury, result.refund) == (360_000, 40_000, 1_600_000)
    assert result.settlement.settled and result.settlement.tx_hash
    assert result.verdicts == ("pass", "pass")
    text = out.getvalue()
    for figure in ("0.360000", "0.040000", "1.600000", "2.000000", result.settlement.tx_hash):
        assert figure in text
