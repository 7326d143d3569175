"""Network presets: where a chain is and what it must look like.

A preset pins the chain id (and, for public networks, the USDC address), so a client
pointed at the wrong RPC endpoint or an unrelated deployment fails at construction,
not at the first transaction.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from inferledger.chain.connect import EMBEDDED, Chain, connect
from inferledger.sdk.errors import ConfigurationError


@dataclass(frozen=True)
class Network:
    """A named chain: its RPC URL, expected chain id and payment token (None: any)."""

    name: str
    rpc_url: str
    chain_id: int | None
    usdc: str | None
    description: str


NETWORKS: dict[str, Network] = {
    "embedded": Network(
        "embedded",
        EMBEDDED,
        None,
        None,
        "in-process py-evm chain shared by every client of this process; gone at exit",
    ),
    "local": Network(
        "local", "http://127.0.0.1:8545", 31337, None, "anvil on loopback (`inferledger chain`)"
    ),
    "base-sepolia": Network(
        "base-sepolia",
        "https://sepolia.base.org",
        84532,
        "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
        "Base Sepolia testnet, paying in Circle's test USDC",
    ),
}


def get_network(name: str) -> Network:
    """The preset called ``name``, or a ConfigurationError listing the known ones."""
    try:
        return NETWORKS[name]
    except KeyError:
        known = ", ".join(NETWORKS)
        raise ConfigurationError(f"unknown network {name!r}: choose one of {known}") from None


_embedded: Chain | None = None
_embedded_lock = threading.Lock()


def embedded_chain() -> Chain:
    """This process's embedded chain, created on first use.

    Shared, so a host client and a user client in one process see the same contracts.
    """
    global _embedded
    with _embedded_lock:
        if _embedded is None:
            _embedded = connect(EMBEDDED)
        return _embedded


def check_chain(chain: Chain, network: Network) -> None:
    """Refuse a chain whose id is not the preset's."""
    if network.chain_id is not None and chain.chain_id != network.chain_id:
        raise ConfigurationError(
            f"{chain.url} is chain id {chain.chain_id}, but network {network.name!r} is chain "
            f"id {network.chain_id}: point the client at the {network.name} RPC endpoint"
        )
