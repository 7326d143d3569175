"""Gas used by each marketplace and dispute action, printed as a table.

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
from inferledger.chain.devchain import (
    INPUT_PRICE,
    PRICE,
    DevWorld,
    build_dev_world,
    open_session,
    sign,
)
from inferledger.chain.receipts import sign_verdict
from inferledger.chain.tx import TxSender

# complete_session rose by about 27k with disputes: the settlement time (a fresh slot, for
# the dispute window) and the host's exposure (what the session paid stays at stake).
BUDGETS = {"create_session": 300_000, "submit_checkpoint": 80_000, "complete_session": 180_000}
FIRST_SESSION = "first session of a fresh deployment"
FIRST_SETTLEMENT = "first settlement of a fresh deployment"
ONE_OFF_CASES = {FIRST_SESSION, FIRST_SETTLEMENT}
URI = "http://127.0.0.1:8080/v1/proofs/0x" + "ab" * 32


def measure(rpc: str) -> list[tuple[str, str, int]]:
    chain = connect(rpc)
    world = build_dev_world(chain, host_stake=100_000_000)  # room for every session here
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
    rows += dispute_rows(world, [third, fourth])
    return rows


def dispute_rows(world: DevWorld, settled: list[int]) -> list[tuple[str, str, int]]:
    """Disputes over two settled sessions: one judged honest, one fraudulent; then the
    dispute window of a third passes and its exposure is released."""
    c, chain = world.contracts, world.chain
    rows: list[tuple[str, str, int]] = []
    jurors = []
    for i in range(3):
        juror = world.funded_sender(f"gas-juror-{i}", 20_000_000)
        c.token.approve(juror, c.verifiers.address, 20_000_000)
        rows.append(
            (
                "verifier register",
                "",
                c.verifiers.register(juror, "http://j", 20_000_000)["gasUsed"],
            )
        )
        jurors.append(juror)
    by_address = {j.address: j for j in jurors}
    challenger = world.funded_sender("gas-challenger", 100_000_000)
    c.token.approve(challenger, c.disputes.address, 2**256 - 1)
    outcomes = [(settled[0], False, "no fraud"), (settled[1], True, "fraud")]
    for session_id, fraud, label in outcomes:
        bundle_hash = keccak(text=f"bundle {session_id}")
        signature = bytes(Account.unsafe_sign_hash(bundle_hash, world.host.account.key).signature)
        fn = c.disputes.contract.functions
        call = fn.open_dispute(session_id, 1, bundle_hash, signature, keccak(text="transcript"))
        receipt = challenger.transact(call, "open_dispute")
        rows.append(("open_dispute", label, receipt["gasUsed"]))
        dispute_id = c.disputes.dispute_count()
        rows.append(("draw", "3 jurors", c.disputes.draw(challenger, dispute_id)["gasUsed"]))
        seats = [by_address[a] for a in c.disputes.get_dispute(dispute_id).seated]
        for n, juror in enumerate(seats[:2]):
            vote = sign_verdict(juror.account.key, c.disputes.domain(), dispute_id, fraud)
            used = c.disputes.submit_verdict(challenger, dispute_id, fraud, vote)["gasUsed"]
            case = "first verdict" if n == 0 else f"verdict that resolves it ({label})"
            rows.append(("submit_verdict", case, used))
    later = open_session(world)[0]
    c.marketplace.complete_session(world.host, later, 0, 0, keccak(text="none"), URI, b"")
    chain.time_travel(c.disputes.dispute_window() + 1)
    rows.append(
        (
            "release_exposure",
            "after the window",
            c.disputes.release_exposure(challenger, later)["gasUsed"],
        )
    )
    rows.append(
        ("withdraw (disputes)", "challenger credit", c.disputes.withdraw(challenger)["gasUsed"])
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rpc", default=EMBEDDED, help="chain URL (default: embedded)")
    args = parser.parse_args()
    table = Table(title=f"inferledger contracts gas ({args.rpc})")
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
