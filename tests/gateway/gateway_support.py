"""Gateway test helpers: a gateway over the SDK test market's node, and extra hosts."""

from __future__ import annotations

from dataclasses import dataclass

from openai import AsyncOpenAI, OpenAI

from inferledger.chain.devchain import DevWorld
from inferledger.chain.tx import TxSender
from inferledger.chain.units import Prices, usdc
from inferledger.gateway import Gateway, GatewayServer
from inferledger.sdk import Client

MODEL = "scripted/words"  # the scripted backend's name, approved by sdk_support's market
HELLO = [{"role": "user", "content": "hello"}]


@dataclass
class Running:
    """A started gateway, the SDK client it pays from, and OpenAI clients for it."""

    gateway: Gateway
    server: GatewayServer
    client: Client

    def openai(self, api_key: str = "unused") -> OpenAI:
        return OpenAI(base_url=self.server.url, api_key=api_key, max_retries=0, timeout=60)

    def async_openai(self, api_key: str = "unused") -> AsyncOpenAI:
        return AsyncOpenAI(base_url=self.server.url, api_key=api_key, max_retries=0, timeout=60)

    def stop(self) -> None:
        """Shut down as SIGTERM would: every session is closed first."""
        self.server.stop()


def register_host(
    world: DevWorld, label: str, url: str, model_id: bytes, prices: Prices
) -> TxSender:
    """A second host (funded, staked) serving ``model_id`` at ``prices`` from ``url``."""
    host = world.funded_sender(label, usdc("100"))
    c = world.contracts
    stake = c.deployment.params.min_stake
    c.token.approve(host, c.nodes.address, stake)
    c.nodes.register(host, url, {model_id: prices}, stake)
    return host


def cost_of(usage: object) -> int:
    """The ``cost`` the gateway adds to OpenAI's usage, in base units."""
    return usdc(usage.model_extra["cost"])  # type: ignore[attr-defined]
