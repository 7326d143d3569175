"""Gas used by each marketplace action, printed as a table.

Run: ``python bench/gas.py`` (embedded chain) or ``python bench/gas.py --rpc URL``.
Gas is deterministic for a given state, so one run is the measurement; the
first-time and repeat figures differ because writing a fresh storage slot costs
more than updating one. Exits with status 1 if an action is over its budget; the
first session and settlement of a fresh deployment are one-off (they write the
contract-wide counters for the first time) and are shown but not held to it.
"""

from __future__ import annotations

import argparse

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from rich.console import Console
from rich.table import Table

from inferledger.chain.connect import EMBEDDED, connect
from inferledger.chain.devchain import INPUT_PRICE, PRICE, build_dev_world, open_session, sign
from inferledger.chain.tx import TxSender

BUDGETS = {"create_session": 300_000, "submit_checkpoint": 80_000, "complete_session": 150_000}
FIRST_SESSION = "first session of a fresh deployment"
FIRST_SETTLEMENT = "first settlement of a fresh deployment"
ONE_OFF_CASES = {FIRST_SESSION, FIRST_SETTLEMENT}
URI = "http://127.0.0.1:8080/v1/proofs/0x" + "ab" * 32


def measure(rpc: str) -> list[tuple[str, str, int]]:
    chain = connect(rpc)
    world = build_dev_world(chain)
    c, market, host, user = world.contracts, world.contracts.marketplace, world.host, world.user
    rows: list[tuple[str, str, int]] = []

    def gas_of(action: str, case: str, sender: TxSender, name: str, *args: object) -> None:
        call = getattr(market.contract.functions, name)(*args)
        rows.append((action, case, sender.transact(call, name)["gasUsed"]))

    def gas_create(case: str, sender: TxSender) -> tuple[int, LocalAccount]:
        signer = Account.create()
        c.token.approve(sender, market.address, 2_000_000)
        gas_of(
            "create_session",
            case,
            sender,
            "create_session",
            host.address,
            world.model_id,
            2_000_000,
            INPUT_PRICE,
            PRICE,
            86400,
            100,
            signer.address,
        )
        return market.contract.functions.session_count().call(), signer

    def gas_receipted(
        action: str, case: str, session_id: int, signer: LocalAccount, tokens: tuple[int, int]
    ) -> None:
        proof = keccak(text=f"{action} {session_id} {tokens}")
        signature = sign(world, signer, session_id, *tokens, proof)
        gas_of(action, case, host, action, session_id, *tokens, proof, URI, signature)

    first, signer1 = gas_create(FIRST_SESSION, user)
    newcomer = world.funded_sender("newcomer", 10_000_000)
    second, signer2 = gas_create("a new user's first session", newcomer)
    third, signer3 = gas_create("a returning user", user)
    # (input, output) cumulative counts: prompts are receipted along with completions.
    gas_receipted("submit_checkpoint", "first checkpoint of a session", first, signer1, (40, 100))
    gas_receipted("submit_checkpoint", "later checkpoint", first, signer1, (90, 200))
    gas_receipted("complete_session", FIRST_SETTLEMENT, first, signer1, (90, 300))
    gas_receipted(
        "complete_session", "final receipt, no prior checkpoint", second, signer2, (60, 150)
    )
    gas_receipted("submit_checkpoint", "first checkpoint of a session", third, signer3, (40, 100))
    gas_of(
        "complete_session",
        "no new receipt (last checkpoint again)",
        host,
        "complete_session",
        third,
        40,
        100,
        keccak(text="unused"),
        URI,
        b"",
    )

    fourth, _ = open_session(world)
    gas_of("request_close", "depositor", user, "request_close", fourth)
    chain.time_travel(c.deployment.params.close_window + 1)
    gas_of("finalize", "after the close window", user, "finalize", fourth)

    receipt = c.earnings.withdraw(host, c.token.address)
    rows.append(("withdraw", "host earnings, one token", receipt["gasUsed"]))
    receipt = c.marketplace.withdraw_treasury(world.owner)
    rows.append(("withdraw_treasury", "treasury", receipt["gasUsed"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rpc", default=EMBEDDED, help="chain URL (default: embedded)")
    args = parser.parse_args()
    table = Table(title=f"JobMarketplace gas ({args.rpc})")
    for column in ("action", "case", "gas used", "budget"):
        table.add_column(column, justify="right" if column in ("gas used", "budget") else "left")
    over = []
    for action, case, used in measure(args.rpc):
        budget = BUDGETS.get(action)
        if budget is None:
            mark = ""
        elif case in ONE_OFF_CASES:
            mark = f"{budget:,} one-off"
        elif used <= budget:
            mark = f"{budget:,} ok"
        else:
            mark = f"{budget:,} OVER"
            over.append(f"{action} ({case}): {used:,} > {budget:,}")
        table.add_row(action, case, f"{used:,}", mark)
    console = Console(width=120)
    console.print(table)
    if over:
        console.print("over budget:\n  " + "\n  ".join(over))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
