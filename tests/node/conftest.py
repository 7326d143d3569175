"""Registers the node test fixtures (defined in node_support, which tests import by name)."""

import pytest
from node_support import scripted, start_node  # noqa: F401

from inferledger.chain.units import usdc
from support import cover_exposure


@pytest.fixture(autouse=True)
def _host_stake_for_many_sessions(request: pytest.FixtureRequest) -> None:
    """Node tests open many sessions on the world's host at once: stake enough that its
    exposure cap (half its stake, docs/disputes.md) is not what they meet."""
    if "world" in request.fixturenames:
        cover_exposure(request.getfixturevalue("world"), usdc("100"))
