"""Choosing a host: the cheapest active offer under the price caps whose node says it is
ready, skipping hosts that failed recently.

A host that fails (unreachable, a protocol error, a receipt the SDK refused) is avoided
for ``cooldown`` seconds, so the next request goes elsewhere instead of paying for the
same failure again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import httpx

from inferledger.sdk import Client, HostOffer
from inferledger.sdk.wire import http_base, ws_endpoint

log = logging.getLogger("inferledger.gateway")
HEALTH_TIMEOUT = 3.0


@dataclass(frozen=True)
class PriceCaps:
    """The most the gateway pays per million input and output tokens; None: any."""

    input_per_mtok: int | None = None
    output_per_mtok: int | None = None


class HostChooser:
    def __init__(self, client: Client, caps: PriceCaps, cooldown: float) -> None:
        self._client = client
        self.caps = caps
        self.cooldown = cooldown
        self._avoided: dict[str, tuple[float, str]] = {}  # host -> (until, why)

    async def offers(self, model_id: bytes | None = None) -> list[HostOffer]:
        """Active offers within the caps, cheapest first (all models when None)."""
        return await asyncio.to_thread(
            self._client.hosts.list,
            model_id,
            self.caps.input_per_mtok,
            self.caps.output_per_mtok,
        )

    def avoid(self, host: str, why: str) -> None:
        log.warning("avoiding host %s for %.0fs: %s", host, self.cooldown, why)
        self._avoided[host.lower()] = (time.monotonic() + self.cooldown, why)

    def avoided(self, host: str) -> str | None:
        """Why ``host`` is avoided now, or None."""
        entry = self._avoided.get(host.lower())
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    def avoided_hosts(self) -> dict[str, str]:
        return {h: why for h, (until, why) in self._avoided.items() if until > time.monotonic()}

    async def choose(self, model_id: bytes) -> HostOffer | None:
        """The cheapest ready offer for ``model_id`` from a host not avoided, or None."""
        async with httpx.AsyncClient(timeout=HEALTH_TIMEOUT) as http:
            for offer in await self.offers(model_id):
                if self.avoided(offer.address) is None and await _ready(http, offer):
                    return offer
        return None


async def _ready(http: httpx.AsyncClient, offer: HostOffer) -> bool:
    """The node's ``/health`` says it takes paid sessions."""
    url = http_base(ws_endpoint(offer.api_url)) + "/health"
    try:
        response = await http.get(url)
        return response.status_code == 200 and bool(response.json().get("accepting_sessions"))
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        log.info("host %s is not ready at %s: %s", offer.address, url, exc)
        return False
