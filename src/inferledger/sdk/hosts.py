"""Hosts: finding offers (users) and managing one's own registration and earnings (hosts)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from eth_utils.crypto import keccak

from inferledger.chain.contracts import HostInfo
from inferledger.chain.units import Prices
from inferledger.sdk.errors import SdkError
from inferledger.sdk.models import HostOffer, Withdrawal

if TYPE_CHECKING:
    from inferledger.sdk.client import Client


def model_id_of(model: str | bytes) -> bytes:
    """A model id: 32 bytes, a 0x-hex id, or a "repo/file" name (hashed like ModelRegistry)."""
    if isinstance(model, bytes):
        if len(model) != 32:
            raise SdkError(f"a model id is 32 bytes, got {len(model)}")
        return model
    if model.startswith("0x") and len(model) == 66:
        return bytes.fromhex(model[2:])
    return keccak(text=model)


class Hosts:
    """Discovery: ``client.hosts.list(model)``."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def list(
        self,
        model: str | bytes | None = None,
        max_input_price_per_mtok: int | None = None,
        max_output_price_per_mtok: int | None = None,
    ) -> list[HostOffer]:
        """Active hosts' offers, cheapest first: by output price (completions are most of
        a bill), then input price, then the larger stake.

        ``model``: a name or id to keep only its offers; the maxima: the most you pay per
        million prompt / completion tokens, in base units.
        """
        nodes = self._client.contracts.nodes
        wanted = model_id_of(model) if model is not None else None
        offers = []
        for address in nodes.hosts():
            info = nodes.get_host(address)
            if not info.active:
                continue
            models = [wanted] if wanted is not None else nodes.host_models(address)
            for model_id in models:
                input_price, output_price = nodes.prices_of(address, model_id)
                if output_price == 0 or not (
                    _within(input_price, max_input_price_per_mtok)
                    and _within(output_price, max_output_price_per_mtok)
                ):
                    continue
                offers.append(
                    HostOffer(
                        address, info.api_url, model_id, input_price, output_price, info.stake
                    )
                )
        return sorted(
            offers,
            key=lambda o: (
                o.output_price_per_mtok,
                o.input_price_per_mtok,
                -o.stake,
                o.address.lower(),
            ),
        )


def _within(price: int, maximum: int | None) -> bool:
    return maximum is None or price <= maximum


def _by_id(prices: dict[str | bytes, tuple[int, int]]) -> dict[bytes, Prices]:
    """Model names or ids -> model ids, with the prices as ``Prices``."""
    return {model_id_of(model): Prices(*pair) for model, pair in prices.items()}


class HostAccount:
    """The client's own host registration and earnings: ``client.host``."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def info(self, address: str | None = None) -> HostInfo:
        """Registration of ``address`` (default: this client's account)."""
        return self._client.contracts.nodes.get_host(address or self._client.account.address)

    def register(
        self, api_url: str, prices: dict[str | bytes, tuple[int, int]], stake: int | None = None
    ) -> str:
        """Approve the stake and register as a host; returns the transaction hash.

        ``prices`` maps each model (name or id) to its (input, output) prices per million
        tokens in base units (input may be 0); ``stake`` defaults to the deployment's minimum.
        """
        c = self._client.contracts
        sender = self._client.sender
        stake = c.deployment.params.min_stake if stake is None else stake
        if stake and c.token.allowance(sender.address, c.nodes.address) < stake:
            c.token.approve(sender, c.nodes.address, stake)
        return c.nodes.register(sender, api_url, _by_id(prices), stake)[
            "transactionHash"
        ].to_0x_hex()

    def update(
        self,
        *,
        api_url: str | None = None,
        prices: dict[str | bytes, tuple[int, int]] | None = None,
    ) -> list[str]:
        """Change the URL and/or the price list (replaces all models and their
        (input, output) prices); transaction hashes."""
        c = self._client.contracts
        sender = self._client.sender
        hashes = []
        if api_url is not None:
            hashes.append(c.nodes.update_url(sender, api_url)["transactionHash"].to_0x_hex())
        if prices is not None:
            hashes.append(c.nodes.set_models(sender, _by_id(prices))["transactionHash"].to_0x_hex())
        return hashes

    def earnings(self, address: str | None = None) -> int:
        """Settled earnings waiting to be withdrawn, in payment-token base units."""
        c = self._client.contracts
        return c.earnings.balance_of(address or self._client.account.address, c.token.address)

    def withdraw(self) -> Withdrawal:
        """Move all settled earnings to this account."""
        c = self._client.contracts
        amount = self.earnings()
        if amount == 0:
            raise SdkError(f"host {self._client.account.address} has no earnings to withdraw")
        receipt = c.earnings.withdraw(self._client.sender, c.token.address)
        return Withdrawal(amount, receipt["transactionHash"].to_0x_hex())


class Treasury:
    """The protocol fee balance: ``client.treasury``."""

    def __init__(self, client: Client) -> None:
        self._client = client

    @property
    def address(self) -> str:
        return self._client.contracts.marketplace.treasury()

    def balance(self) -> int:
        return self._client.contracts.marketplace.treasury_balance()

    def withdraw(self) -> Withdrawal:
        """Move the accumulated fees to the treasury (this client must be the treasury)."""
        market = self._client.contracts.marketplace
        me = self._client.account.address
        if me.lower() != self.address.lower():
            raise SdkError(f"only the treasury {self.address} can withdraw fees, not {me}")
        amount = self.balance()
        if amount == 0:
            raise SdkError("the treasury balance is zero: nothing to withdraw")
        receipt = market.withdraw_treasury(self._client.sender)
        return Withdrawal(amount, receipt["transactionHash"].to_0x_hex())
