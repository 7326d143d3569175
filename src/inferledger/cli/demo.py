"""The contract-level walk-through of the seed incident's verification steps.

Until the node exists this plays the host's part directly against the contracts;
every figure printed is read back from the chain, not computed locally.
"""

from __future__ import annotations

from eth_account import Account
from eth_utils import keccak
from rich.console import Console
from rich.table import Table

from inferledger.chain.connect import connect
from inferledger.chain.devchain import build_dev_world
from inferledger.chain.errors import ChainError
from inferledger.chain.receipts import Receipt, sign_receipt
from inferledger.chain.units import format_usdc, price_per_token_to_mtok, usdc
from inferledger.config import Settings

DEPOSIT = usdc("2")
PRICE_PER_MTOK = price_per_token_to_mtok("0.002")
TOKENS = 200
PROOF_INTERVAL = 100
DURATION = 86400


def run_demo(settings: Settings) -> None:
    console = Console()
    with console.status("connecting and compiling contracts..."):
        chain = connect(
            settings.chain_url,
            gas_cap=settings.gas_cap,
            receipt_timeout=settings.receipt_timeout,
        )
        if not chain.is_dev:
            raise ChainError(
                f"{settings.chain_url} is not a dev chain: the demo mints test USDC; "
                "run it on the embedded chain or anvil"
            )
        world = build_dev_world(chain, host_price_per_mtok=PRICE_PER_MTOK)
    c = world.contracts
    console.print(f"[bold]chain[/] {chain.url} (chain id {chain.chain_id}, {chain.client})")
    for name, address in c.deployment.addresses:
        console.print(f"  {name:<15} {address}")
    console.print(f"host {world.host.address} registered at $0.002/token ({PRICE_PER_MTOK}/Mtok)")

    signer = Account.create()
    refund_before = c.token.balance_of(world.user.address)
    c.token.approve(world.user, c.marketplace.address, DEPOSIT)
    session_id = c.marketplace.create_session(
        world.user,
        host=world.host.address,
        model_id=world.model_id,
        deposit=DEPOSIT,
        price_per_mtok=PRICE_PER_MTOK,
        max_duration=DURATION,
        proof_interval=PROOF_INTERVAL,
        session_signer=signer.address,
    )
    console.print(f"session {session_id}: user deposited {format_usdc(DEPOSIT)} USDC")

    # Stand-in for the proof bundle hash that the proofs layer will produce.
    proof_hash = keccak(text=f"walk-through session {session_id}, {TOKENS} tokens")
    receipt = Receipt(session_id=session_id, tokens=TOKENS, proof_hash=proof_hash)
    signature = sign_receipt(signer.key, c.marketplace.domain(), receipt)
    checkpoint = c.marketplace.submit_checkpoint(
        world.host, session_id, TOKENS, proof_hash, "walkthrough://no-bundle", signature
    )
    console.print(
        f"checkpoint submitted on chain: {TOKENS} tokens, "
        f"tx {checkpoint['transactionHash'].to_0x_hex()}"
    )
    settlement = c.marketplace.complete_session(
        world.host, session_id, TOKENS, proof_hash, "walkthrough://no-bundle", signature
    )
    console.print(f"session completed: tx {settlement.tx_hash}")

    host_balance = c.earnings.balance_of(world.host.address, c.token.address)
    treasury_balance = c.marketplace.treasury_balance()
    refund = c.token.balance_of(world.user.address) - (refund_before - DEPOSIT)
    table = Table(title=f"Seed verification: {TOKENS} tokens at $0.002/token, 2 USDC deposit")
    table.add_column("who")
    table.add_column("USDC", justify="right")
    table.add_column("read from")
    table.add_row("host", format_usdc(host_balance), "HostEarnings.balance_of")
    table.add_row("treasury", format_usdc(treasury_balance), "JobMarketplace.treasury_balance")
    table.add_row("refund", format_usdc(refund), "user's token balance")
    table.add_row("total", format_usdc(host_balance + treasury_balance + refund), "= deposit")
    console.print(table)
    if host_balance + treasury_balance + refund != DEPOSIT:
        raise ChainError("settlement does not add up to the deposit: this is a bug, report it")
