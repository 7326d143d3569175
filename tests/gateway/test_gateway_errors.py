"""Each status the gateway answers, as the ``openai`` client raises it, in OpenAI's shape;
a refused request opens no session and spends nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import openai
import pytest
from gateway_support import HELLO, MODEL

from inferledger.chain.errors import ChainUnreachable
from inferledger.config import ConfigError, load_settings
from inferledger.gateway import check_exposure

if TYPE_CHECKING:
    from sdk_support import Market

    from conftest import GatewayFactory


def sessions_opened(market: Market, user: str | None) -> list[int]:
    return market.world.contracts.marketplace.sessions_of_user(user)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_unsupported_or_invalid_fields_get_a_400_naming_them(
    market: Market, start_gateway: GatewayFactory, extra: dict[str, object], param: str
) -> None:
    run = start_gateway()
    request: dict[str, object] = {"model": MODEL, "messages": HELLO, **extra}
    with pytest.raises(openai.BadRequestError) as caught:
        run.openai().chat.completions.create(**request)  # type: ignore[call-overload]
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == param
    assert error["type"] == "invalid_request_error" and param.split("[")[0] in error["message"]
    assert caught.value.response.headers["x-inferledger-cost"] == "0.000000"
    assert sessions_opened(market, run.client.address) == []


def test_a_stranger_without_the_key_gets_401_and_spends_nothing(
    market: Market, start_gateway: GatewayFactory
) -> None:
    run = start_gateway(gateway_api_key="the-gateway-key")
    with pytest.raises(openai.AuthenticationError) as caught:
        run.openai("a-guess").chat.completions.create(model=MODEL, messages=HELLO)
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        run.openai("a-guess").models.list()
    bare = httpx.post(
        f"{run.server.url}/chat/completions", json={"model": MODEL, "messages": HELLO}
    )
    assert bare.status_code == 401 and "missing API key" in bare.json()["error"]["message"]
    assert httpx.get(f"{run.server.url}/inferledger/sessions").status_code == 401
    assert sessions_opened(market, run.client.address) == []
    # The key holder is served.
    reply = run.openai("the-gateway-key").chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=2
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 2


def test_a_spend_limit_gives_402_naming_the_budget_and_what_is_left(
    market: Market, start_gateway: GatewayFactory
) -> None:
    run = start_gateway(
        gateway_spend_limit_day="1", gateway_spend_limit_total="0.1", gateway_reserve_tokens=1
    )
    client = run.openai()
    first = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10)
    spent = run.gateway.ledger.total
    assert spent > 0 and first.usage is not None
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=20)
    assert caught.value.status_code == 402
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "budget_exceeded"
    assert error["budget"] == "total"
    assert error["left"] == f"{(100_000 - spent) / 1e6:.6f}"
    assert run.gateway.ledger.total == spent  # nothing was sent
    # Without max_tokens the reply is held to what the limit leaves, never above it.
    held = client.chat.completions.create(model=MODEL, messages=HELLO)
    assert held.choices[0].finish_reason == "length" and held.usage is not None
    assert held.usage.completion_tokens > 1
    assert spent < run.gateway.ledger.total <= 100_000


def test_an_unknown_model_is_404(market: Market, start_gateway: GatewayFactory) -> None:
    run = start_gateway()
    with pytest.raises(openai.NotFoundError) as caught:
        run.openai().chat.completions.create(model="no/such-model", messages=HELLO)
    assert caught.value.code == "model_not_found"
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "model"


def test_no_host_within_the_price_cap_is_503_with_retry_after(
    market: Market, start_gateway: GatewayFactory
) -> None:
    run = start_gateway(gateway_max_price="0.0001")  # the host asks 0.002 per token
    with pytest.raises(openai.InternalServerError) as caught:
        run.openai().chat.completions.create(model=MODEL, messages=HELLO, stream=True)
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"].isdigit()
    assert caught.value.code == "no_host_available"
    assert run.openai().models.list().data == []  # no offer within the cap
    assert sessions_opened(market, run.client.address) == []


def test_models_lists_the_cheapest_offer_per_model(
    market: Market, start_gateway: GatewayFactory
) -> None:
    run = start_gateway()
    (model,) = run.openai().models.list().data
    assert model.id == MODEL
    pricing = model.model_extra["pricing"]  # type: ignore[index]
    assert (pricing["prompt"], pricing["completion"]) == ("0.0005", "0.002")


def test_binding_beyond_loopback_without_a_key_refuses_to_start() -> None:
    with pytest.raises(ConfigError, match=r"setting gateway_api_key \(INFERLEDGER_GATEWAY_API_KEY"):
        check_exposure(load_settings(gateway_bind="0.0.0.0"))
    check_exposure(load_settings(gateway_bind="0.0.0.0", gateway_api_key="k"))
    check_exposure(load_settings(gateway_bind="::1"))


def test_a_chain_that_cannot_be_read_is_503_chain_unavailable(
    market: Market, start_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = start_gateway()

    def unreachable(*args: object) -> bool:
        raise ChainUnreachable("cannot reach http://rpc.example (setting chain_url)")

    monkeypatch.setattr(run.client.contracts.models, "is_approved", unreachable)
    with pytest.raises(openai.InternalServerError) as caught:
        run.openai().chat.completions.create(model=MODEL, messages=HELLO)
    assert caught.value.status_code == 503 and caught.value.code == "chain_unavailable"
    assert "retry-after" in caught.value.response.headers
