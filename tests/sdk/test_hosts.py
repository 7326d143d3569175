"""Discovery: active hosts' offers, filtered by model and price, cheapest first."""

from __future__ import annotations

from eth_utils import keccak

from inferledger.chain.devchain import DEV_MODEL_NAME, PRICE, DevWorld, dev_account
from inferledger.chain.units import usdc
from inferledger.sdk import Client

OTHER_MODEL = "org/other-model.gguf"


def host_client(world: DevWorld, label: str) -> Client:
    world.funded_sender(label, usdc("100"))
    return Client(
        world.chain, key="0x" + dev_account(label).key.hex(), deployment=world.contracts.deployment
    )


def test_list_keeps_active_hosts_filters_by_model_and_price_cheapest_first(
    world: DevWorld,
) -> None:
    c = world.contracts
    c.models.approve_model(world.owner, OTHER_MODEL, b"\x02" * 32)
    dev, other = keccak(text=DEV_MODEL_NAME), keccak(text=OTHER_MODEL)
    cheap = host_client(world, "host-cheap")
    cheap.host.register("http://cheap:8080", {DEV_MODEL_NAME: PRICE // 2})
    pricey = host_client(world, "host-pricey")
    pricey.host.register(
        "https://pricey.example", {DEV_MODEL_NAME: PRICE * 3, other: PRICE}, stake=usdc("50")
    )
    leaving = host_client(world, "host-leaving")
    leaving.host.register("http://leaving:8080", {DEV_MODEL_NAME: 1})
    c.nodes.request_unstake(leaving.sender)  # inactive: never offered

    user = Client(world.chain, deployment=c.deployment)  # no key needed to look
    offers = user.hosts.list()
    assert [(o.address, o.model_id, o.price_per_mtok) for o in offers] == [
        (cheap.address, dev, PRICE // 2),
        (pricey.address, other, PRICE),  # same price: the larger stake first
        (world.host.address, dev, PRICE),
        (pricey.address, dev, PRICE * 3),
    ]
    assert offers[1].api_url == "https://pricey.example" and offers[1].stake == usdc("50")
    assert offers[2].stake == c.deployment.params.min_stake

    by_name = user.hosts.list(model=DEV_MODEL_NAME)
    assert [o.address for o in by_name] == [cheap.address, world.host.address, pricey.address]
    assert user.hosts.list(model=dev) == by_name == user.hosts.list(model="0x" + dev.hex())
    assert [o.address for o in user.hosts.list(model=OTHER_MODEL)] == [pricey.address]
    assert [(o.address, o.model_id) for o in user.hosts.list(max_price=PRICE)] == [
        (cheap.address, dev),
        (pricey.address, other),
        (world.host.address, dev),
    ]
    assert user.hosts.list(model=DEV_MODEL_NAME, max_price=PRICE // 2 - 1) == []
    assert user.hosts.list(model="nobody/serves-this.gguf") == []

    # Hosts manage their own listing.
    cheap.host.update(prices={DEV_MODEL_NAME: PRICE * 4}, api_url="http://cheap:9090")
    assert user.hosts.list(model=dev)[-1].address == cheap.address
    assert cheap.host.info().api_url == "http://cheap:9090"


def test_a_model_id_reads_back_the_name_it_was_approved_under(world: DevWorld) -> None:
    models = world.contracts.models
    assert models.model_name(keccak(text=DEV_MODEL_NAME)) == DEV_MODEL_NAME
    assert models.model_name(keccak(text="never/approved.gguf")) == ""
