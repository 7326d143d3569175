"""`inferledger chain`: a local anvil that keeps its state, and a faucet for dev chains."""

from __future__ import annotations

import contextlib
import signal
import socket
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from inferledger.chain.errors import ChainError
from inferledger.cli.common import (
    HOST_KEY_ENV,
    USER_KEY_ENV,
    CliError,
    DeploymentOption,
    RpcOption,
    connect_chain,
    deployed_contracts,
    err,
    one_line_errors,
    out,
    parse_usdc,
    require_deployment_file,
    settings_for,
)
from inferledger.config import env_name

if TYPE_CHECKING:
    from rich.console import Console

    from inferledger.chain.connect import Chain
    from inferledger.chain.contracts import Contracts

DEV_LABELS = {
    "owner": "deploys and owns the contracts (`deploy`, `model approve` use it by default)",
    "host": f"for {HOST_KEY_ENV} (`host register`, `node run`)",
    "user": f"for {USER_KEY_ENV} (`chat`, `session close`)",
}
START_GAS_ETH = 100
WEI = 10**18

chain_app = typer.Typer(
    help="Run a local dev chain (anvil) and fund accounts on it.",
    add_completion=False,
)


@chain_app.callback(invoke_without_command=True)
def chain(
    ctx: typer.Context,
    port: Annotated[
        int, typer.Option("--port", min=1, max=65535, help="Port anvil listens on (127.0.0.1).")
    ] = 8545,
    state: Annotated[
        Path | None,
        typer.Option(
            "--state",
            metavar="FILE",
            help="Where anvil keeps the chain between runs (loaded at start, written every "
            "5 s and on exit). Default: $INFERLEDGER_HOME/anvil-state.json.",
        ),
    ] = None,
) -> None:
    """Start anvil on 127.0.0.1, print its URL and dev accounts, and run until Ctrl-C.

    The chain is loaded from and saved to a state file, so contracts deployed on it
    survive a restart. The dev accounts' keys are public: use them on dev chains only.
    Needs anvil: `npm install @foundry-rs/anvil@1.7.1` in the project directory.
    """
    if ctx.invoked_subcommand is not None:
        return
    with one_line_errors():
        _run_chain(port, state)


def _run_chain(port: int, state: Path | None) -> None:
    from inferledger.chain.anvil import ANVIL_PACKAGE, find_anvil, start_anvil
    from inferledger.chain.connect import connect
    from inferledger.paths import home

    if find_anvil() is None:
        raise CliError(
            f"anvil is not installed: run `npm install {ANVIL_PACKAGE}` in the project "
            "directory (or set INFERLEDGER_ANVIL to an anvil binary), then run "
            "`inferledger chain` again"
        )
    state_file = (state or home() / "anvil-state.json").expanduser().resolve()
    state_file.parent.mkdir(parents=True, exist_ok=True)
    resumed = state_file.is_file()
    _require_free_port(port)
    with err().status(f"starting anvil on 127.0.0.1:{port}..."):
        try:
            anvil = start_anvil(port, state_file=state_file)
        except ChainError as exc:
            if not resumed:
                raise
            raise CliError(
                f"{exc}; if the state file {state_file} is damaged or from another anvil "
                "version, move it aside or pass --state with a new path"
            ) from exc
    previous_term = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        chain = connect(anvil.url)
        accounts = _fund_dev_accounts(chain)
        _print_banner(
            anvil.url, chain.chain_id, state_file, resumed, chain.block_number(), accounts
        )
        code = anvil.process.wait()
        raise CliError(
            f"anvil exited unexpectedly with code {code}; its state file is {state_file} "
            "(move it aside if it is damaged)"
        )
    except KeyboardInterrupt:
        # From a terminal, Ctrl-C reached anvil too and it is writing its state; give it a
        # moment, then stop() sends SIGTERM, on which anvil writes its state as well.
        with contextlib.suppress(Exception):
            anvil.process.wait(timeout=1)
    finally:
        anvil.stop()
        signal.signal(signal.SIGTERM, previous_term)
    err().print(f"anvil stopped; chain state saved to {state_file}")


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _require_free_port(port: int) -> None:
    """Refuse a port something listens on: start_anvil would take that for our anvil."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            pass
    except OSError:
        return
    raise CliError(
        f"port {port} on 127.0.0.1 is in use (another `inferledger chain`?): stop it or pass "
        "--port with a free port"
    )


def _fund_dev_accounts(chain: Chain) -> list[tuple[str, str, str, int]]:
    """(label, address, key, wei) of the dev accounts; host and user get gas money."""
    from inferledger.chain.devchain import dev_account

    rows: list[tuple[str, str, str, int]] = []
    for label in DEV_LABELS:
        account = dev_account(label)
        balance = int(chain.w3.eth.get_balance(account.address))
        if label != "owner" and balance < WEI:
            chain.fund(account.address, START_GAS_ETH * WEI)
            balance += START_GAS_ETH * WEI
        rows.append((label, account.address, "0x" + account.key.hex(), balance))
    return rows


def _print_banner(
    url: str,
    chain_id: int,
    state_file: Path,
    resumed: bool,
    block: int,
    accounts: list[tuple[str, str, str, int]],
) -> None:
    console = out()
    where = (
        f"resumed from {state_file} at block {block}" if resumed else f"new, saved to {state_file}"
    )
    console.print(f"[bold green]anvil running[/] at [bold]{url}[/] (chain id {chain_id}; {where})")
    console.print("\ndev accounts (public keys: dev chains only):")
    for label, address, key, wei in accounts:
        console.print(
            f"  [bold]{label:<5}[/] {address}  {Decimal(wei) / WEI:f} ETH  {DEV_LABELS[label]}"
        )
        console.print(f"        key {key}")
    host_key = accounts[1][2]
    user_key = accounts[2][2]
    console.print(
        "\nnext, in another terminal:\n"
        f"  export {env_name('chain_url')}={url}\n"
        "  inferledger deploy\n"
        f"  export {HOST_KEY_ENV}={host_key} {USER_KEY_ENV}={user_key}\n"
        f"  inferledger chain fund {accounts[1][1]} --usdc 100\n"
        f"  inferledger chain fund {accounts[2][1]} --usdc 100\n"
        "\nCtrl-C stops the chain and saves its state.",
        markup=False,
    )


@chain_app.command("fund")
def fund(
    address: Annotated[str, typer.Argument(help="Account to fund (0x address).")],
    eth: Annotated[str, typer.Option("--eth", help="Gas money to add, in ETH (0 for none).")] = "1",
    usdc_amount: Annotated[
        str,
        typer.Option(
            "--usdc",
            help="TestUSDC to mint, in USDC (0 for none); needs the deployment record.",
        ),
    ] = "100",
    rpc: RpcOption = None,
    deployment: DeploymentOption = None,
) -> None:
    """Give an account gas money and TestUSDC on a dev chain (anvil or hardhat).

    Refuses any other chain: there, get ETH and USDC from the network's faucets.
    """
    from eth_utils.address import is_address, to_checksum_address

    with one_line_errors():
        if not is_address(address):
            raise CliError(f"{address!r} is not an address: give 0x and 40 hex digits")
        target = to_checksum_address(address)
        wei = _parse_eth(eth)
        base_units = parse_usdc(usdc_amount, "--usdc")
        settings = settings_for(rpc, deployment)
        chain = connect_chain(settings)
        if not chain.is_dev:
            raise CliError(
                f"`chain fund` only works on a dev chain (anvil, hardhat): {chain.url} is "
                f"'{chain.client}' with chain id {chain.chain_id}; get ETH and USDC from that "
                "network's faucets instead"
            )
        # Before any transaction: a missing record must not leave the ETH half done.
        if base_units:
            require_deployment_file(settings)
        console = out()
        if wei:
            chain.fund(target, wei)
            balance = chain.w3.eth.get_balance(target)
            console.print(
                f"{target}: +{Decimal(wei) / WEI:f} ETH (now {Decimal(balance) / WEI:f} ETH)"
            )
        if base_units:
            _mint(deployed_contracts(settings, chain), target, base_units, console)


def _mint(contracts: Contracts, target: str, amount: int, console: Console) -> None:
    from inferledger.chain.devchain import GAS_MONEY, dev_account
    from inferledger.chain.units import format_usdc

    chain = contracts.chain
    if contracts.deployment.params.token is not None:
        raise CliError(
            f"the deployment pays in {contracts.deployment.addresses.token}, not a TestUSDC it "
            "deployed, so it cannot be minted: pass --usdc 0 and get the token elsewhere"
        )
    faucet = chain.sender(dev_account("faucet"))
    if chain.w3.eth.get_balance(faucet.address) < WEI:
        chain.fund(faucet.address, GAS_MONEY)
    contracts.token.mint(faucet, target, amount)
    balance = contracts.token.balance_of(target)
    console.print(
        f"{target}: +{format_usdc(amount)} USDC (now {format_usdc(balance)} USDC, token "
        f"{contracts.token.address})"
    )


def _parse_eth(value: str) -> int:
    try:
        wei = Decimal(value) * WEI
    except InvalidOperation:
        raise CliError(f"--eth {value!r} is not an amount: give ETH as a number, e.g. 1") from None
    if wei < 0 or wei != wei.to_integral_value():
        raise CliError(f"--eth {value!r} must be a non-negative amount with at most 18 decimals")
    return int(wei)
