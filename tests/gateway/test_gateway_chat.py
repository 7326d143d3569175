"""The official ``openai`` client, sync and async, streaming and not, through the gateway
to a real node: the answer arrives and what the usage says it cost is what settles."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from gateway_support import HELLO, MODEL, cost_of
from node_support import wait_until

from inferledger.chain.units import cost
from inferledger.gateway.pool import signed_cost
from inferledger.inference import load_backend

if TYPE_CHECKING:
    from sdk_support import Market, NodeFactory

    from conftest import GatewayFactory


def test_sync_and_async_replies_cost_exactly_what_settles_on_chain(
    market: Market, start_gateway: GatewayFactory
) -> None:
    c = market.world.contracts
    run = start_gateway()
    user = run.client.address
    assert user is not None
    balance_before = c.token.balance_of(user)
    client = run.openai()

    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, max_tokens=7, seed=5
    )
    whole = raw.parse()
    stream = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=7,
        seed=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    async def async_calls() -> tuple[object, list[object]]:
        aclient = run.async_openai()
        reply = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "again"}], max_completion_tokens=4
        )
        pieces = [
            chunk
            async for chunk in await aclient.chat.completions.create(
                model=MODEL,
                messages=HELLO,
                max_tokens=3,
                stream=True,
                stream_options={"include_usage": True},
            )
        ]
        return reply, pieces

    async_whole, async_chunks = asyncio.run(async_calls())

    # The answer arrives, whole or in pieces; the same prompt and seed give the same text.
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 7
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # include_usage
    assert async_whole.usage.completion_tokens == 4  # type: ignore[attr-defined]
    assert "".join(ch.choices[0].delta.content or "" for ch in async_chunks if ch.choices)
    usages = [whole.usage, chunks[-1].usage, async_whole.usage, async_chunks[-1].usage]  # type: ignore[attr-defined]

    # One session served all four, named in the header and the usage.
    session_id = int(raw.headers["x-inferledger-session"])
    assert raw.headers["x-inferledger-cost"] == whole.usage.model_extra["cost"]
    for usage in usages:
        extra = usage.model_extra["inferledger"]
        assert extra["session_id"] == session_id and extra["host"] == market.world.host.address
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert usage.prompt_tokens > 0
    last = usages[-1].model_extra["inferledger"]
    prompts = sum(u.prompt_tokens for u in usages)
    replies = sum(u.completion_tokens for u in usages)
    assert (last["receipted_input_tokens"], last["receipted_output_tokens"]) == (prompts, replies)
    assert last["checkpoints"] >= 1 and all(h.startswith("0x") for h in last["proof_hashes"])

    run.stop()  # closes the session: the node settles it

    (settlement,) = run.gateway.pool.settlements
    assert settlement.session_id == session_id and settlement.status == "settled"
    assert (settlement.input_tokens, settlement.output_tokens) == (prompts, replies)
    info = c.marketplace.get_session(session_id)
    paid = settlement.host_amount + settlement.fee
    # Each reply's cost adds up to exactly what the chain charged, rounded once.
    assert sum(cost_of(u) for u in usages) == paid
    assert paid == cost(prompts, replies, info.input_price_per_mtok, info.output_price_per_mtok)
    assert c.token.balance_of(user) == balance_before - paid
    assert run.gateway.ledger.total == paid


def test_the_readme_example_runs_against_a_gateway(
    market: Market, start_gateway: GatewayFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    run = start_gateway()
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("### Any OpenAI client")[1].split("```python\n")[1].split("```")[0]
    assert "http://127.0.0.1:8787/v1" in block and len(block.strip().splitlines()) == 5
    exec(block.replace("http://127.0.0.1:8787/v1", run.server.url), {})
    printed = capsys.readouterr().out
    assert "ChatCompletion(" in printed and "cost='" in printed


def test_a_client_that_leaves_mid_stream_stops_the_reply_and_pays_what_was_signed(
    market: Market, start_gateway: GatewayFactory, start_node: NodeFactory
) -> None:
    _node, slow = start_node(load_backend("scripted", tokens_per_second=40))
    market.world.contracts.nodes.update_url(market.world.host, slow.url)
    run = start_gateway()
    client = run.openai()
    stream = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=2000, stream=True
    )
    next(iter(stream))
    stream.close()  # the client leaves after the first chunk

    def idle() -> bool:
        sessions = run.gateway.view()["sessions"]
        return bool(sessions) and not sessions[0]["busy"]

    wait_until(idle, "the gateway to let go of the session")
    (pooled,) = run.gateway.pool.sessions.values()
    received = pooled.session.tokens
    assert 0 < received < 200  # stopped, not streamed on to 2000
    # What was signed for is spent, nothing more, and the session serves the next request.
    assert run.gateway.ledger.total == signed_cost(pooled.session.record)
    after = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
    assert after.usage is not None and after.usage.completion_tokens == 3
    assert after.usage.model_extra["inferledger"]["session_id"] == pooled.session.id


def test_concurrent_requests_share_one_session_and_each_pays_its_own_share(
    market: Market, start_gateway: GatewayFactory
) -> None:
    run = start_gateway()

    async def many() -> list[object]:
        aclient = run.async_openai()
        return await asyncio.gather(
            *(
                aclient.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5 + i)
                for i in range(4)
            )
        )

    replies = asyncio.run(many())
    usages = [r.usage for r in replies]  # type: ignore[attr-defined]
    assert sorted(u.completion_tokens for u in usages) == [5, 6, 7, 8]
    assert len({u.model_extra["inferledger"]["session_id"] for u in usages}) == 1
    run.stop()
    (settlement,) = run.gateway.pool.settlements
    assert sum(cost_of(u) for u in usages) == settlement.host_amount + settlement.fee
    assert settlement.output_tokens == 26
