"""Discovery: active hosts' offers, filtered by model and price, cheapest first."""

from __future__ import annotations

from eth_utils import keccak

from inferledger.chain.devchain import DEV_MODEL_NAME, INPUT_PRICE, PRICE, DevWorld, dev_account
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
    cheap.host.register("http://cheap:8080", {DEV_MODEL_NAME: (INPUT_PRICE * 9, PRICE // 2)})
    pricey = host_client(world, "host-pricey")
    pricey.host.register(
        "https://pricey.example",
        {DEV_MODEL_NAME: (0, PRICE * 3), other: (INPUT_PRICE, PRICE)},
        stake=usdc("50"),
    )
    free_prompts = host_client(world, "host-free-prompts")
    free_prompts.host.register("http://free:8080", {other: (0, PRICE)})
    leaving = host_client(world, "host-leaving")
    leaving.host.register("http://leaving:8080", {DEV_MODEL_NAME: (0, 1)})
    c.nodes.request_unstake(leaving.sender)  # inactive: never offered

    user = Client(world.chain, deployment=c.deployment)  # no key needed to look
    offers = user.hosts.list()
    # Cheapest output price first (a pricey prompt does not matter before that), then
    # the cheaper input price, then the larger stake.
    prices = [
        (o.address, o.model_id, o.input_price_per_mtok, o.output_price_per_mtok) for o in offers
    ]
    assert prices == [
        (cheap.address, dev, INPUT_PRICE * 9, PRICE // 2),
        (free_prompts.address, other, 0, PRICE),  # same output price, free prompts first
        (pricey.address, other, INPUT_PRICE, PRICE),  # same prices: the larger stake first
        (world.host.address, dev, INPUT_PRICE, PRICE),
        (pricey.address, dev, 0, PRICE * 3),
    ]
    assert offers[2].api_url == "https://pricey.example" and offers[2].stake == usdc("50")
    assert offers[3].stake == c.deployment.params.min_stake

    by_name = user.hosts.list(model=DEV_MODEL_NAME)
    assert [o.address for o in by_name] == [cheap.address, world.host.address, pricey.address]
    assert user.hosts.list(model=dev) == by_name == user.hosts.list(model="0x" + dev.hex())
    assert [o.address for o in user.hosts.list(model=OTHER_MODEL)] == [
        free_prompts.address,
        pricey.address,
    ]
    assert [(o.address, o.model_id) for o in user.hosts.list(max_output_price_per_mtok=PRICE)] == [
        (cheap.address, dev),
        (free_prompts.address, other),
        (pricey.address, other),
        (world.host.address, dev),
    ]
    # Both maxima apply: the cheap host's prompts are too dear for this user.
    capped = user.hosts.list(max_input_price_per_mtok=INPUT_PRICE, max_output_price_per_mtok=PRICE)
    assert [(o.address, o.model_id) for o in capped] == [
        (free_prompts.address, other),
        (pricey.address, other),
        (world.host.address, dev),
    ]
    assert [o.address for o in user.hosts.list(max_input_price_per_mtok=0)] == [
        free_prompts.address,
        pricey.address,
    ]
    assert user.hosts.list(model=DEV_MODEL_NAME, max_output_price_per_mtok=PRICE // 2 - 1) == []
    assert user.hosts.list(model="nobody/serves-this.gguf") == []

    # Hosts manage their own listing.
    cheap.host.update(prices={DEV_MODEL_NAME: (1, PRICE * 4)}, api_url="http://cheap:9090")
    last = user.hosts.list(model=dev)[-1]
    assert (last.address, last.input_price_per_mtok, last.output_price_per_mtok) == (
        cheap.address,
        1,
        PRICE * 4,
    )
    assert cheap.host.info().api_url == "http://cheap:9090"


def test_a_model_id_reads_back_the_name_it_was_approved_under(world: DevWorld) -> None:
    models = world.contracts.models
    assert models.model_name(keccak(text=DEV_MODEL_NAME)) == DEV_MODEL_NAME
    assert models.model_name(keccak(text="never/approved.gguf")) == ""
