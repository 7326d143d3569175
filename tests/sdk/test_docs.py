"""docs/sdk.md's examples, run in order against the embedded chain.

The page's Python blocks run in one namespace, as a reader would paste them. The
environment they read is set up here: contracts deployed on this process's embedded
chain, the model approved, accounts funded; the page's ``inferledger node run`` step
starts the same node in process (another process could not reach the embedded chain).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from eth_account.signers.local import LocalAccount

from inferledger.chain.anvil import free_port
from inferledger.chain.deploy import deploy
from inferledger.chain.devchain import GAS_MONEY, dev_account
from inferledger.chain.units import cost, price_per_token_to_mtok, usdc
from inferledger.config import load_settings
from inferledger.inference import load_backend
from inferledger.node.node import create_node
from inferledger.node.server import BackgroundServer
from inferledger.node.state import NodeState
from inferledger.paths import home
from inferledger.sdk import lifecycle
from inferledger.sdk.networks import embedded_chain

DOC = Path(__file__).resolve().parents[2] / "docs" / "sdk.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(DOC.read_text())]


def test_sdk_docs_examples_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Isolated data directory (session records), keeping the compiled-contracts cache.
    shutil.copytree(home() / "contracts", tmp_path / "home" / "contracts")
    for name in ("INFERLEDGER_NETWORK", "INFERLEDGER_CHAIN_URL", "INFERLEDGER_DEPLOYMENT_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("INFERLEDGER_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)

    chain = embedded_chain()
    owner = chain.sender(dev_account("owner"))
    chain.fund(owner.address, GAS_MONEY)
    contracts = deploy(chain, owner)
    contracts.deployment.save(tmp_path / "deployment.json")
    backend = load_backend("scripted", tokens_per_second=0)
    contracts.models.approve_model(owner, backend.name, b"\x01" * 32)

    def funded(label: str) -> LocalAccount:
        account = dev_account(label)
        chain.fund(account.address, GAS_MONEY)
        contracts.token.mint(owner, account.address, usdc("100"))
        return account

    host, user = funded("docs-host"), funded("docs-user")
    port = free_port()
    monkeypatch.setenv("INFERLEDGER_HOST_KEY", "0x" + host.key.hex())
    monkeypatch.setenv("INFERLEDGER_MODEL_NAME", backend.name)
    monkeypatch.setenv("NODE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("INFERLEDGER_KEY", "0x" + user.key.hex())
    monkeypatch.setenv("TREASURY_KEY", "0x" + dev_account("owner").key.hex())
    host_wallet = contracts.token.balance_of(host.address)

    servers: list[BackgroundServer] = []

    def inferledger_node_run() -> None:
        """What `inferledger node run` does, in this process."""
        settings = load_settings(chain_url="embedded", state_db=tmp_path / "node.sqlite3")
        node = create_node(
            settings, contracts=contracts, backend=backend, state=NodeState(settings.state_db)
        )
        assert node.ready, node.preflight.lines()
        servers.append(BackgroundServer(node, port=port).start())

    namespace: dict[str, object] = {"__name__": "docs_sdk"}
    ran = 0
    try:
        for number, (language, code) in enumerate(blocks(), 1):
            if language == "python":
                exec(compile(code, f"{DOC}:block{number}", "exec"), namespace)
                ran += 1
            elif language == "bash" and "inferledger node run" in code:
                inferledger_node_run()
    finally:
        for server in servers:
            server.stop()
        for session in lifecycle.open_sessions():
            lifecycle.unregister(session)

    assert ran == 6 and servers, "the page's examples were not all found"
    output = capsys.readouterr().out
    settlement = namespace["settlement"]
    reply = namespace["reply"]
    assert settlement.status == "settled" and settlement.reported_by == "node"  # type: ignore[attr-defined]
    assert settlement.output_tokens == len(reply.token_ids) + 20  # type: ignore[attr-defined]
    # Two prompts were paid too, at the page's input price: the cost was over both.
    assert settlement.input_tokens > reply.prompt_tokens > 0  # type: ignore[attr-defined]
    assert reply.input_tokens == reply.prompt_tokens  # type: ignore[attr-defined]
    assert f"so far {reply.input_tokens} in, {len(reply.token_ids)} out" in output  # type: ignore[attr-defined]
    paid = cost(
        settlement.input_tokens,  # type: ignore[attr-defined]
        settlement.output_tokens,  # type: ignore[attr-defined]
        price_per_token_to_mtok("0.0005"),
        price_per_token_to_mtok("0.002"),
    )
    assert paid == settlement.host_amount + settlement.fee  # type: ignore[attr-defined]
    assert reply.text and reply.text in output  # type: ignore[attr-defined]
    assert "refund 1." in output  # 2 USDC deposit, a few tokens used
    # Everything the page's sessions paid the host was withdrawn, and the fees too.
    withdrawn = namespace["withdrawal"].amount  # type: ignore[attr-defined]
    assert withdrawn > settlement.host_amount  # type: ignore[attr-defined]
    assert contracts.earnings.balance_of(host.address, contracts.token.address) == 0
    assert contracts.token.balance_of(host.address) == host_wallet - usdc("10") + withdrawn
    assert contracts.marketplace.treasury_balance() == 0
    assert list((tmp_path / "home" / "sessions").glob("*.json"))


def test_the_readme_example_is_part_of_the_executed_page() -> None:
    """The README's SDK example is lines of docs/sdk.md, so the test above runs them."""
    readme = DOC.parents[1] / "README.md"
    (example,) = [
        body
        for lang, body in FENCE.findall(readme.read_text())
        if lang == "python" and "inferledger.sdk" in body  # (the openai one: tests/gateway)
    ]
    page = {line.rstrip() for _, body in blocks() for line in body.splitlines()}
    missing = [line for line in example.splitlines() if line.strip() and line.rstrip() not in page]
    assert not missing, missing
