"""What the chain, host, session, chat and verify commands share: options, settings,
clients and keys, amounts, and the one-line error handler."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from inferledger.chain.errors import ChainError
from inferledger.config import ConfigError, Settings, env_name, load_settings, setting_ref
from inferledger.node.preflight import PreflightFailed

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

    from inferledger.chain.connect import Chain
    from inferledger.chain.contracts import Contracts
    from inferledger.sdk import Client

USER_KEY_ENV = "INFERLEDGER_KEY"
HOST_KEY_ENV = env_name("host_key")
DEPLOYER_KEY_ENV = env_name("deployer_key")
LOCAL_CHAIN = "http://127.0.0.1:8545"


class CliError(Exception):
    """A command cannot go on; the message names the problem and the fix."""


RpcOption = Annotated[
    str | None,
    typer.Option(
        "--rpc",
        metavar="URL",
        help="JSON-RPC URL of the chain, e.g. http://127.0.0.1:8545 (`inferledger chain`). "
        f"Default: the {setting_ref('chain_url')}.",
    ),
]
DeploymentOption = Annotated[
    Path | None,
    typer.Option(
        "--deployment",
        metavar="FILE",
        help="Deployment record written by `inferledger deploy`. Default: the "
        f"{setting_ref('deployment_file')}, else ./deployment.json.",
    ),
]


def out() -> Console:
    """Results (what a script would read)."""
    return Console(highlight=False, soft_wrap=True)


def err() -> Console:
    """Progress, notes and errors, on stderr."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """One yellow ``warning: ...`` line on stderr: worth fixing, but the command went on."""
    err().print(f"warning: {' '.join(message.split())}", style="yellow", markup=False)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Expected failures end the command with one red ``error: ...`` line and exit 1."""
    from inferledger.inference.base import BackendError
    from inferledger.sdk.errors import SdkError

    try:
        yield
    except (
        ChainError,
        ConfigError,
        PreflightFailed,
        SdkError,
        BackendError,
        CliError,
    ) as exc:
        # One line per problem: a failed preflight lists each broken check on its own line.
        message = "\n".join(" ".join(line.split()) for line in str(exc).splitlines())
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from exc


def settings_for(
    rpc: str | None = None, deployment: Path | None = None, **options: object
) -> Settings:
    """The settings with the command's options applied; an option left out (None) keeps the
    setting."""
    given = {"chain_url": rpc or None, "deployment_file": deployment, **options}
    return load_settings(**{name: value for name, value in given.items() if value is not None})


def connect_chain(settings: Settings) -> Chain:
    """The configured chain; the embedded one is refused (it lives inside one process)."""
    from inferledger.chain.connect import EMBEDDED, connect

    if settings.chain_url == EMBEDDED:
        raise CliError(
            f"{setting_ref('chain_url')} is 'embedded', a chain that lives and "
            "dies inside one process; start one with `inferledger chain` and pass "
            f"--rpc {LOCAL_CHAIN} (or export {env_name('chain_url')}={LOCAL_CHAIN})"
        )
    return connect(settings.chain_url, **settings.sender_options())


def require_deployment_file(settings: Settings) -> Path:
    path = settings.deployment_file
    if not path.is_file():
        raise CliError(
            f"deployment record {path} not found: run `inferledger deploy` first, or pass "
            f"--deployment FILE (or set {env_name('deployment_file')})"
        )
    return path


def deployed_contracts(settings: Settings, chain: Chain | None = None) -> Contracts:
    """The recorded deployment's contracts on ``chain`` (default: the configured chain),
    for the commands that sign as the owner or the faucet rather than through a Client."""
    from inferledger.chain.contracts import Contracts
    from inferledger.chain.deployment import Deployment

    chain = chain or connect_chain(settings)
    return Contracts.attach(chain, Deployment.load(require_deployment_file(settings)))


def make_client(rpc: str | None, deployment: Path | None, *, key: str | None = None) -> Client:
    """An SDK client on the configured chain and deployment, acting with ``key`` (None:
    read-only, unless ``INFERLEDGER_KEY`` is set)."""
    from inferledger.sdk import Client

    settings = settings_for(rpc, deployment)
    chain = connect_chain(settings)
    path = require_deployment_file(settings)
    return Client(chain, key=key, deployment=path)


def env_key(name: str, role: str) -> str:
    """The private key in environment variable ``name``, or a CliError saying how to set it."""
    value = os.environ.get(name, "").strip()
    if not value:
        raise CliError(
            f"{name} is not set: export {name}=0x<the {role}'s private key> (on a dev chain "
            "`inferledger chain` prints keys you can use)"
        )
    return value


def setting_key(settings: Settings, name: str, role: str) -> str:
    """The private key in setting ``name`` (``host_key``, ``verifier_key``), or a CliError
    saying how to set it."""
    value = getattr(settings, name)
    if value is None:
        raise CliError(
            f"{setting_ref(name)} is not set: export {env_name(name)}=0x<the {role}'s "
            "private key> (on a dev chain `inferledger chain` prints keys you can use)"
        )
    return str(value.get_secret_value()).strip()


def host_key(settings: Settings) -> str:
    return setting_key(settings, "host_key", "host")


def owner_account(settings: Settings, chain: Chain) -> LocalAccount:
    """The contracts' owner, as ``inferledger deploy`` picks it: the deployer_key setting,
    else on a dev chain the public dev owner key (funded with gas if it has none)."""
    from eth_account import Account

    from inferledger.chain.devchain import GAS_MONEY, dev_account

    if settings.deployer_key is not None:
        try:
            account: LocalAccount = Account.from_key(
                settings.deployer_key.get_secret_value().strip()
            )
            return account
        except Exception:
            raise CliError(
                f"{setting_ref('deployer_key')} is not a valid private key: "
                "expected 32 bytes as 0x-hex"
            ) from None
    if not chain.is_dev:
        raise CliError(
            f"{setting_ref('deployer_key')} is required on a non-dev chain: "
            "export it with the key that deployed the contracts"
        )
    owner = dev_account("owner")
    if chain.w3.eth.get_balance(owner.address) < GAS_MONEY // 100:
        chain.fund(owner.address, GAS_MONEY)
    return owner


def parse_usdc(value: str, option: str) -> int:
    """A human USDC amount (``"0.5"``) in base units, or a CliError naming the option."""
    from inferledger.chain.units import usdc

    try:
        amount = usdc(value)
    except (ValueError, InvalidOperation):
        raise CliError(
            f"{option} {value!r} is not a USDC amount: use a number with at most 6 decimals, "
            "e.g. 2 or 0.25"
        ) from None
    if amount < 0:
        raise CliError(f"{option} must not be negative")
    return amount


def parse_price(value: str, option: str = "--output-price", *, allow_zero: bool = False) -> int:
    """USDC per token (``"0.002"``) as base units per million tokens.

    ``allow_zero``: for input prices, where 0 means free prompts.
    """
    from inferledger.chain.units import price_per_token_to_mtok

    try:
        price = price_per_token_to_mtok(value)
    except (ValueError, InvalidOperation):
        raise CliError(
            f"{option} {value!r} is not a price: give USDC per token with at most 12 "
            "decimals, e.g. 0.002"
        ) from None
    if price < 0 or (price == 0 and not allow_zero):
        limit = "zero or more" if allow_zero else "above zero"
        raise CliError(f"{option} must be {limit}, e.g. 0.002 (USDC per token)")
    return price


def price_text(price_per_mtok: int) -> str:
    """Base units per million tokens as USDC per token, e.g. ``0.002``."""
    from inferledger.chain.units import MTOK, USDC

    per_token = Decimal(price_per_mtok) / (USDC * MTOK)
    return f"{per_token.normalize():f}"


def prices_text(input_price_per_mtok: int, output_price_per_mtok: int) -> str:
    """Both prices of a model as USDC per token: ``input 0.0005, output 0.002``."""
    return f"input {price_text(input_price_per_mtok)}, output {price_text(output_price_per_mtok)}"


def default_model_name(settings: Settings) -> str:
    """The model_name setting, else the packaged SmolLM2's name (as the node names it)."""
    from inferledger.inference.model_cache import GGUF_FILENAME, GGUF_PACKAGE

    return settings.model_name or f"{GGUF_PACKAGE}/{GGUF_FILENAME}"


def model_label(contracts: Contracts, model_id: bytes) -> str:
    """A model's approved name and id, e.g. ``org/file.gguf (0x12ab...)``."""
    hex_id = "0x" + model_id.hex()
    try:
        name = contracts.models.model_name(model_id)
    except Exception:  # a label is no reason to fail the command
        return hex_id
    return f"{name} ({hex_id[:10]}...)" if name else hex_id


def fmt_time(timestamp: int) -> str:
    """A chain timestamp, in UTC."""
    import datetime as dt

    if not timestamp:
        return "-"
    moment = dt.datetime.fromtimestamp(timestamp, tz=dt.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")
