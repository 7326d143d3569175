"""Every revert path of JobMarketplace, plus the positive checks next to its boundaries."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from eth_account import Account
from eth_keys import keys
from eth_utils import keccak

from inferledger.chain.compile import compile_all
from inferledger.chain.contracts import Contracts
from inferledger.chain.deploy import deploy
from inferledger.chain.deployment import DeployParams
from inferledger.chain.devchain import DevWorld
from inferledger.chain.errors import ContractRevert
from inferledger.chain.receipts import Receipt, receipt_digest, sign_receipt
from inferledger.chain.units import cost, settlement_split, usdc
from support import (
    INPUT_PRICE,
    PRICE,
    PROOF,
    URI,
    cover_exposure,
    deploy_failing_token,
    open_session,
    sign,
)

ZERO = "0x" + "00" * 20
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
WINDOW = 3600  # DeployParams.close_window
DEPOSIT = usdc("2")  # buys 1000 output tokens at PRICE, or 4000 input tokens at INPUT_PRICE
METHODS = ["submit_checkpoint", "complete_session"]


# Helpers ---------------------------------------------------------------------------


@contextmanager
def reverts(reason: str) -> Iterator[None]:
    with pytest.raises(ContractRevert) as info:
        yield
    assert info.value.reason == reason


def next_block_at(world: DevWorld, timestamp: int) -> None:
    """Make the next transaction be estimated and mined at block time ``timestamp``."""
    chain = world.chain
    if chain.is_embedded:
        # eth-tester estimates against the pending block, one second after the latest.
        if chain.now() < timestamp - 2:
            chain.time_travel(timestamp - 1 - chain.now())
        while chain.now() < timestamp - 1:
            chain.mine()
        assert chain.w3.eth.get_block("pending")["timestamp"] == timestamp
    else:
        # anvil accepts equal timestamps: pin both the latest and the next block.
        request = chain.w3.provider.make_request
        request("evm_setNextBlockTimestamp", [timestamp])
        request("evm_mine", [])
        request("evm_setNextBlockTimestamp", [timestamp])


def view(world: DevWorld, name: str, *args: Any) -> Any:
    return getattr(world.contracts.marketplace.contract.functions, name)(*args).call()


def state(world: DevWorld, *session_ids: int) -> dict[str, Any]:
    """What a marketplace action could move, for before/after comparisons."""
    c = world.contracts
    mp = c.marketplace
    return {
        "user": c.token.balance_of(world.user.address),
        "host": c.token.balance_of(world.host.address),
        "marketplace": c.token.balance_of(mp.address),
        "earnings": c.token.balance_of(c.earnings.address),
        "user_credit": mp.refund_credit(world.user.address),
        "treasury_balance": mp.treasury_balance(),
        "open_deposits": mp.open_deposits(),
        "session_count": view(world, "session_count"),
        "host_open_sessions": c.nodes.get_host(world.host.address).open_sessions,
        "sessions": [mp.get_session(i) for i in session_ids],
    }


@contextmanager
def unchanged(world: DevWorld, *session_ids: int) -> Iterator[None]:
    before = state(world, *session_ids)
    yield
    assert state(world, *session_ids) == before


def rejected(world: DevWorld, reason: str, action: Callable[[], Any], *session_ids: int) -> None:
    """``action`` reverts with ``reason`` and leaves the marketplace state untouched."""
    with unchanged(world, *session_ids), reverts(reason):
        action()


def create_args(world: DevWorld, **overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "host": world.host.address,
        "model_id": world.model_id,
        "deposit": DEPOSIT,
        "max_input_price_per_mtok": INPUT_PRICE,
        "max_output_price_per_mtok": PRICE,
        "max_duration": 86400,
        "proof_interval": 100,
        "session_signer": Account.create().address,
    }
    return args | overrides


def checkpoint(
    world: DevWorld, method: str, sender: Any, sid: int, tokens: tuple[int, int], sig: bytes
) -> Any:
    """``method`` with the receipt ``sig`` for cumulative (input, output) ``tokens``."""
    return getattr(world.contracts.marketplace, method)(sender, sid, *tokens, PROOF, URI, sig)


def paid_counts(world: DevWorld, sid: int) -> tuple[int, int]:
    session = world.contracts.marketplace.get_session(sid)
    return session.input_tokens_paid, session.output_tokens_paid


def split(sig: bytes) -> tuple[bytes, int, int]:
    return sig[:32], int.from_bytes(sig[32:64], "big"), sig[64]


# create_session --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"max_input_price_per_mtok": INPUT_PRICE - 1}, "host input price above offered price"),
        ({"max_input_price_per_mtok": 0}, "host input price above offered price"),
        ({"max_output_price_per_mtok": PRICE - 1}, "host output price above offered price"),
        ({"deposit": 9_999}, "deposit below minimum"),
        ({"deposit": 10_000 * 10**6 + 1}, "deposit above maximum"),
        ({"proof_interval": 9}, "proof interval too small"),
        ({"proof_interval": 1_000_001}, "proof interval too large"),
        ({"max_duration": 59}, "duration too short"),
        ({"max_duration": 30 * 86400 + 1}, "duration too long"),
        ({"session_signer": ZERO}, "signer is the zero address"),
        ({"proof_interval": 1001}, "deposit buys less than one proof interval"),
    ],
    ids=lambda v: v if isinstance(v, str) else next(iter(v)),
)
def test_create_session_rejects_bad_parameters(
    world: DevWorld, overrides: dict[str, Any], reason: str
) -> None:
    c = world.contracts
    args = create_args(world, **overrides)
    c.token.approve(world.user, c.marketplace.address, args["deposit"])
    rejected(
        world,
        f"JobMarketplace: {reason}",
        lambda: c.marketplace.create_session(world.user, **args),
    )


def test_create_session_accepts_every_boundary_value(world: DevWorld) -> None:
    cover_exposure(world, usdc("25000"))
    c = world.contracts
    c.token.approve(world.user, c.marketplace.address, 2**256 - 1)
    for overrides in [
        {"proof_interval": 10},
        # Exactly one interval: 1000 output tokens cost the whole deposit (the interval
        # is counted in output tokens only, prompts are not part of it).
        {"proof_interval": 1000},
        {"max_duration": 60},
        {"max_duration": 30 * 86400},
    ]:
        args = create_args(world, **overrides)
        sid = c.marketplace.create_session(world.user, **args)
        session = c.marketplace.get_session(sid)
        assert session.is_open
        assert session.expires_at - session.created_at == args["max_duration"]
        assert session.proof_interval == args["proof_interval"]
    assert c.marketplace.open_deposits() == 4 * DEPOSIT

    # Deposit bounds are inclusive: the minimum with a host cheap enough for one
    # interval of 10 tokens, and the maximum.
    cheap = world.funded_sender("cheap host", usdc("10"))
    c.token.approve(cheap, c.nodes.address, usdc("10"))
    c.nodes.register(cheap, "ws://cheap", {world.model_id: (7, 1_000_000_000)}, usdc("10"))
    rich = world.funded_sender("rich user", 10_000 * 10**6 + 10_000)
    c.token.approve(rich, c.marketplace.address, 2**256 - 1)
    low = c.marketplace.create_session(
        rich,
        **create_args(
            world,
            host=cheap.address,
            deposit=10_000,
            max_input_price_per_mtok=7,
            max_output_price_per_mtok=10**9,
            proof_interval=10,
        ),
    )
    high = c.marketplace.create_session(rich, **create_args(world, deposit=10_000 * 10**6))
    assert c.marketplace.get_session(low).deposit == 10_000
    low_session = c.marketplace.get_session(low)
    assert (low_session.input_price_per_mtok, low_session.output_price_per_mtok) == (7, 10**9)
    assert c.marketplace.get_session(high).deposit == 10_000 * 10**6
    assert c.token.balance_of(rich.address) == 0


def test_create_session_prices_at_host_prices_not_offer(world: DevWorld) -> None:
    c = world.contracts
    args = create_args(
        world, max_input_price_per_mtok=INPUT_PRICE * 5, max_output_price_per_mtok=PRICE * 3
    )
    c.token.approve(world.user, c.marketplace.address, DEPOSIT)
    sid = c.marketplace.create_session(world.user, **args)
    session = c.marketplace.get_session(sid)
    assert (session.input_price_per_mtok, session.output_price_per_mtok) == (INPUT_PRICE, PRICE)
    # A later price change does not touch the open session's snapshot.
    c.nodes.set_models(world.host, {world.model_id: (INPUT_PRICE + 1, PRICE + 1)})
    session = c.marketplace.get_session(sid)
    assert (session.input_price_per_mtok, session.output_price_per_mtok) == (INPUT_PRICE, PRICE)


def test_session_created_event_carries_both_prices(world: DevWorld) -> None:
    c = world.contracts
    c.token.approve(world.user, c.marketplace.address, DEPOSIT)
    receipt = world.user.transact(
        c.marketplace.contract.functions.create_session(*create_args(world).values())
    )
    (event,) = c.marketplace._events("SessionCreated", receipt)
    prices = (event["args"]["input_price_per_mtok"], event["args"]["output_price_per_mtok"])
    assert prices == (INPUT_PRICE, PRICE)


def test_create_session_rejects_inactive_host(world: DevWorld) -> None:
    c = world.contracts
    c.nodes.request_unstake(world.host)
    c.token.approve(world.user, c.marketplace.address, DEPOSIT)
    rejected(
        world,
        "JobMarketplace: host not active",
        lambda: c.marketplace.create_session(world.user, **create_args(world)),
    )


def test_create_session_rejects_unregistered_host(world: DevWorld) -> None:
    c = world.contracts
    c.token.approve(world.user, c.marketplace.address, DEPOSIT)
    with reverts("JobMarketplace: host not active"):
        c.marketplace.create_session(world.user, **create_args(world, host=world.user.address))


def test_create_session_rejects_revoked_model(world: DevWorld) -> None:
    c = world.contracts
    c.models.revoke_model(world.owner, world.model_id)
    c.token.approve(world.user, c.marketplace.address, DEPOSIT)
    rejected(
        world,
        "JobMarketplace: model not approved",
        lambda: c.marketplace.create_session(world.user, **create_args(world)),
    )


def test_create_session_rejects_model_the_host_does_not_serve(world: DevWorld) -> None:
    c = world.contracts
    other_model = c.models.approve_model(world.owner, "other/model", b"\x02" * 32)
    c.token.approve(world.user, c.marketplace.address, DEPOSIT)
    rejected(
        world,
        "JobMarketplace: host does not serve this model",
        lambda: c.marketplace.create_session(
            world.user, **create_args(world, model_id=other_model)
        ),
    )


def test_create_session_without_allowance_reverts_with_token_reason(world: DevWorld) -> None:
    # TestUSDC reverts (it never returns False), so its own reason surfaces rather
    # than "JobMarketplace: deposit transfer failed"; the whole creation is undone,
    # including the NodeRegistry open-session count bumped before the transfer.
    c = world.contracts
    assert c.token.allowance(world.user.address, c.marketplace.address) == 0
    rejected(
        world,
        "TestUSDC: allowance too low",
        lambda: c.marketplace.create_session(world.user, **create_args(world)),
    )
    c.token.approve(world.user, c.marketplace.address, DEPOSIT - 1)
    rejected(
        world,
        "TestUSDC: allowance too low",
        lambda: c.marketplace.create_session(world.user, **create_args(world)),
    )


def test_create_session_without_balance_reverts_with_token_reason(world: DevWorld) -> None:
    cover_exposure(world, usdc("25000"))
    c = world.contracts
    deposit = c.token.balance_of(world.user.address) + 1
    c.token.approve(world.user, c.marketplace.address, deposit)
    rejected(
        world,
        "TestUSDC: balance too low",
        lambda: c.marketplace.create_session(world.user, **create_args(world, deposit=deposit)),
    )


# submit_checkpoint and complete_session: the shared receipt checks -----------------


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_rejects_unknown_session(world: DevWorld, method: str) -> None:
    signer = Account.create()
    with unchanged(world):
        for tokens in (0, 100):
            with reverts("JobMarketplace: session not open"):
                checkpoint(
                    world, method, world.host, 999, (0, tokens), sign(world, signer, 999, 0, tokens)
                )


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_rejects_settled_session(world: DevWorld, method: str) -> None:
    sid, signer = open_session(world)
    world.contracts.marketplace.complete_session(
        world.host, sid, 0, 100, PROOF, URI, sign(world, signer, sid, 0, 100)
    )
    with unchanged(world, sid):
        for tokens in (100, 200):
            with reverts("JobMarketplace: session not open"):
                checkpoint(
                    world, method, world.host, sid, (0, tokens), sign(world, signer, sid, 0, tokens)
                )


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_rejects_caller_other_than_host(world: DevWorld, method: str) -> None:
    sid, signer = open_session(world)
    stranger = world.funded_sender("stranger")
    with unchanged(world, sid):
        for caller in (world.user, stranger, world.owner):
            with reverts("JobMarketplace: caller is not the host"):
                checkpoint(world, method, caller, sid, (0, 100), sign(world, signer, sid, 0, 100))


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_rejects_after_deadline(world: DevWorld, method: str) -> None:
    sid, signer = open_session(world, duration=60)
    world.chain.time_travel(60 + WINDOW + 5)
    with unchanged(world, sid):
        for tokens in (0, 100):  # even settling at what was already receipted
            with reverts("JobMarketplace: session deadline passed"):
                checkpoint(
                    world, method, world.host, sid, (0, tokens), sign(world, signer, sid, 0, tokens)
                )


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_rejects_either_count_below_last_checkpoint(
    world: DevWorld, method: str
) -> None:
    mp = world.contracts.marketplace
    sid, signer = open_session(world)
    mp.submit_checkpoint(world.host, sid, 80, 200, PROOF, URI, sign(world, signer, sid, 80, 200))
    with unchanged(world, sid):
        # Lower output, lower input, both lower, and one lower with the other higher.
        for tokens in [(80, 199), (79, 200), (0, 0), (79, 300), (100, 199)]:
            with reverts("JobMarketplace: tokens must not decrease"):
                checkpoint(
                    world, method, world.host, sid, tokens, sign(world, signer, sid, *tokens)
                )
    assert paid_counts(world, sid) == (80, 200)


def test_submit_checkpoint_rejects_repeated_token_counts(world: DevWorld) -> None:
    mp = world.contracts.marketplace
    sid, signer = open_session(world)
    rejected(
        world,
        "JobMarketplace: tokens must increase",
        lambda: mp.submit_checkpoint(
            world.host, sid, 0, 0, PROOF, URI, sign(world, signer, sid, 0, 0)
        ),
        sid,
    )
    sig = sign(world, signer, sid, 80, 200)
    mp.submit_checkpoint(world.host, sid, 80, 200, PROOF, URI, sig)
    rejected(
        world,
        "JobMarketplace: tokens must increase",
        lambda: mp.submit_checkpoint(world.host, sid, 80, 200, PROOF, URI, sig),
        sid,
    )


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_rejects_tokens_beyond_deposit(world: DevWorld, method: str) -> None:
    # 2 USDC buys 1000 output tokens at $0.002, or 4000 input tokens at $0.0005; the
    # budget counts both: 4 input + 999 output tokens cost exactly the deposit.
    sid, signer = open_session(world)
    for over in [(0, 1001), (4001, 0), (5, 999)]:
        rejected(
            world,
            "JobMarketplace: tokens exceed budget",
            lambda t=over: checkpoint(
                world, method, world.host, sid, t, sign(world, signer, sid, *t)
            ),
            sid,
        )
    checkpoint(world, method, world.host, sid, (4, 999), sign(world, signer, sid, 4, 999))
    assert paid_counts(world, sid) == (4, 999)


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_rejects_receipt_over_the_wrong_input_count(
    world: DevWorld, method: str
) -> None:
    sid, signer = open_session(world)
    sig = sign(world, signer, sid, 50, 100)
    with unchanged(world, sid):
        for tokens in [(0, 100), (49, 100), (51, 100)]:
            with reverts("JobMarketplace: receipt not signed by session signer"):
                checkpoint(world, method, world.host, sid, tokens, sig)
    checkpoint(world, method, world.host, sid, (50, 100), sig)
    assert paid_counts(world, sid) == (50, 100)


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_rejects_receipt_from_other_key(world: DevWorld, method: str) -> None:
    sid, _signer = open_session(world)
    with unchanged(world, sid):
        for key in (Account.create(), Account.from_key(bytes(31) + b"\x01")):
            with reverts("JobMarketplace: receipt not signed by session signer"):
                checkpoint(world, method, world.host, sid, (0, 100), sign(world, key, sid, 0, 100))


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_rejects_malformed_signatures(world: DevWorld, method: str) -> None:
    sid, signer = open_session(world)
    sig = sign(world, signer, sid, 0, 100)
    cases = [(sig[:length], "receipt signature must be 65 bytes") for length in (0, 1, 64)]
    cases += [(sig[:64] + bytes([v]), "bad receipt signature v") for v in (0, 1, 26, 29, 255)]
    # ecrecover fails (returns the zero address) for r or s outside [1, n - 1].
    one = (1).to_bytes(32, "big")
    cases += [
        (sig, "invalid receipt signature")
        for sig in (bytes(64) + b"\x1b", bytes(32) + one + b"\x1c", one + bytes(32) + b"\x1b")
    ]
    with unchanged(world, sid):
        for bad, reason in cases:
            with reverts(f"JobMarketplace: {reason}"):
                checkpoint(world, method, world.host, sid, (0, 100), bad)
    checkpoint(world, method, world.host, sid, (0, 100), sig)
    assert paid_counts(world, sid) == (0, 100)


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_rejects_malleable_twin_signature(world: DevWorld, method: str) -> None:
    mp = world.contracts.marketplace
    sid, signer = open_session(world)
    sig = sign(world, signer, sid, 0, 100)
    r, s, v = split(sig)
    assert s <= SECP256K1_N // 2  # eth-account signs low-s
    twin = r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])
    # The twin is a genuine signature by the session signer...
    digest = receipt_digest(mp.domain(), Receipt(sid, 0, 100, PROOF))
    twin_sig = keys.Signature(vrs=(28 - v, int.from_bytes(r, "big"), SECP256K1_N - s))
    assert twin_sig.recover_public_key_from_msg_hash(digest).to_checksum_address() == (
        signer.address
    )
    # ...and only the high-s check keeps it out. n // 2 is the largest s accepted.
    over = r + (SECP256K1_N // 2 + 1).to_bytes(32, "big") + bytes([v])
    with unchanged(world, sid):
        for bad in (twin, over):
            with reverts("JobMarketplace: malleable receipt signature"):
                checkpoint(world, method, world.host, sid, (0, 100), bad)
    checkpoint(world, method, world.host, sid, (0, 100), sig)
    assert paid_counts(world, sid) == (0, 100)


def test_complete_session_at_last_checkpoint_needs_no_new_receipt(world: DevWorld) -> None:
    c = world.contracts
    sid, signer = open_session(world)
    c.marketplace.submit_checkpoint(
        world.host, sid, 0, 300, PROOF, URI, sign(world, signer, sid, 0, 300)
    )
    settled = c.marketplace.complete_session(world.host, sid, 0, 300, PROOF, URI, b"\x00" * 7)
    expected = settlement_split(DEPOSIT, 0, 300, INPUT_PRICE, PRICE, 1000)
    assert (settled.output_tokens, settled.host_amount, settled.fee, settled.refund) == (
        300,
        expected.host,
        expected.fee,
        expected.refund,
    )
    assert c.marketplace.get_session(sid).checkpoints == 1


# request_close ---------------------------------------------------------------------


def test_request_close_rejects_unknown_and_settled_sessions(world: DevWorld) -> None:
    mp = world.contracts.marketplace
    rejected(world, "JobMarketplace: session not open", lambda: mp.request_close(world.user, 999))
    sid, signer = open_session(world)
    mp.complete_session(world.host, sid, 0, 100, PROOF, URI, sign(world, signer, sid, 0, 100))
    rejected(
        world, "JobMarketplace: session not open", lambda: mp.request_close(world.user, sid), sid
    )


def test_request_close_rejects_anyone_but_the_depositor(world: DevWorld) -> None:
    mp = world.contracts.marketplace
    sid, _signer = open_session(world)
    stranger = world.funded_sender("stranger")
    with unchanged(world, sid):
        for caller in (world.host, world.owner, stranger):
            with reverts("JobMarketplace: caller is not the depositor"):
                mp.request_close(caller, sid)


def test_request_close_rejects_second_request(world: DevWorld) -> None:
    mp = world.contracts.marketplace
    sid, _signer = open_session(world)
    receipt = mp.request_close(world.user, sid)
    requested_at = world.chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"]
    assert mp.get_session(sid).close_requested_at == requested_at
    assert mp.session_deadline(sid) == requested_at + WINDOW
    world.chain.time_travel(100)
    rejected(
        world,
        "JobMarketplace: close already requested",
        lambda: mp.request_close(world.user, sid),
        sid,
    )
    assert mp.session_deadline(sid) == requested_at + WINDOW


def test_request_close_after_expiry_does_not_extend_deadline(world: DevWorld) -> None:
    mp = world.contracts.marketplace
    sid, _signer = open_session(world, duration=60)
    deadline = mp.session_deadline(sid)
    assert deadline == mp.get_session(sid).expires_at + WINDOW
    world.chain.time_travel(120)
    mp.request_close(world.user, sid)
    assert mp.session_deadline(sid) == deadline


# finalize --------------------------------------------------------------------------


def test_finalize_rejects_unknown_and_settled_sessions(world: DevWorld) -> None:
    mp = world.contracts.marketplace
    rejected(world, "JobMarketplace: session not open", lambda: mp.finalize(world.owner, 999))
    sid, _signer = open_session(world, duration=60)
    world.chain.time_travel(60 + WINDOW + 5)
    mp.finalize(world.owner, sid)
    rejected(world, "JobMarketplace: session not open", lambda: mp.finalize(world.owner, sid), sid)
    rejected(world, "JobMarketplace: session not open", lambda: mp.finalize(world.user, sid), sid)


def test_finalize_rejects_during_close_window(world: DevWorld) -> None:
    mp = world.contracts.marketplace
    sid, _signer = open_session(world)
    stranger = world.funded_sender("stranger")
    rejected(
        world,
        "JobMarketplace: close window still open",
        lambda: mp.finalize(stranger, sid),
        sid,
    )
    mp.request_close(world.user, sid)
    world.chain.time_travel(WINDOW // 2)
    with unchanged(world, sid):
        for caller in (stranger, world.user, world.host):
            with reverts("JobMarketplace: close window still open"):
                mp.finalize(caller, sid)


def test_finalize_rejects_expired_session_until_window_passes(world: DevWorld) -> None:
    mp = world.contracts.marketplace
    sid, signer = open_session(world, duration=60)
    world.chain.time_travel(60 + WINDOW // 2)
    assert world.chain.now() > mp.get_session(sid).expires_at
    rejected(
        world,
        "JobMarketplace: close window still open",
        lambda: mp.finalize(world.owner, sid),
        sid,
    )
    # The host may still checkpoint after expiry, inside the window.
    mp.submit_checkpoint(world.host, sid, 0, 150, PROOF, URI, sign(world, signer, sid, 0, 150))
    world.chain.time_travel(WINDOW)
    stranger = world.funded_sender("stranger")
    user_before = world.contracts.token.balance_of(world.user.address)
    settled = mp.finalize(stranger, sid)
    expected = settlement_split(DEPOSIT, 0, 150, INPUT_PRICE, PRICE, 1000)
    assert (settled.output_tokens, settled.host_amount, settled.fee, settled.refund) == (
        150,
        expected.host,
        expected.fee,
        expected.refund,
    )
    assert world.contracts.token.balance_of(world.user.address) == user_before + expected.refund
    assert mp.get_session(sid).is_settled


@pytest.mark.parametrize("trigger", ["close request", "expiry"])
def test_finalize_only_strictly_after_deadline(world: DevWorld, trigger: str) -> None:
    mp = world.contracts.marketplace
    sid, signer = open_session(world, duration=60 if trigger == "expiry" else 86400)
    if trigger == "close request":
        mp.request_close(world.user, sid)
    deadline = mp.session_deadline(sid)

    next_block_at(world, deadline)
    rejected(
        world,
        "JobMarketplace: close window still open",
        lambda: mp.finalize(world.owner, sid),
        sid,
    )
    # The deadline second itself still belongs to the host.
    receipt = mp.submit_checkpoint(
        world.host, sid, 0, 100, PROOF, URI, sign(world, signer, sid, 0, 100)
    )
    assert world.chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"] == deadline

    next_block_at(world, deadline + 1)
    rejected(
        world,
        "JobMarketplace: session deadline passed",
        lambda: mp.submit_checkpoint(
            world.host, sid, 0, 200, PROOF, URI, sign(world, signer, sid, 0, 200)
        ),
        sid,
    )
    settled = mp.finalize(world.owner, sid)
    assert world.chain.now() == deadline + 1
    assert settled.output_tokens == 100
    assert mp.get_session(sid).is_settled


# Settlement paths next to the boundaries -------------------------------------------


def test_host_can_checkpoint_and_complete_during_close_window(world: DevWorld) -> None:
    mp = world.contracts.marketplace
    sid, signer = open_session(world)
    mp.submit_checkpoint(world.host, sid, 0, 100, PROOF, URI, sign(world, signer, sid, 0, 100))
    mp.request_close(world.user, sid)
    deadline = mp.session_deadline(sid)
    world.chain.time_travel(WINDOW // 2)
    mp.submit_checkpoint(world.host, sid, 0, 200, PROOF, URI, sign(world, signer, sid, 0, 200))
    next_block_at(world, deadline)
    settled = mp.complete_session(
        world.host, sid, 0, 300, PROOF, URI, sign(world, signer, sid, 0, 300)
    )
    assert settled.output_tokens == 300
    session = mp.get_session(sid)
    assert (session.output_tokens_paid, session.checkpoints, session.is_settled) == (300, 3, True)


def test_anyone_finalizes_after_close_window_at_last_checkpoint(world: DevWorld) -> None:
    c = world.contracts
    mp = c.marketplace
    sid, signer = open_session(world)
    mp.submit_checkpoint(world.host, sid, 150, 400, PROOF, URI, sign(world, signer, sid, 150, 400))
    mp.request_close(world.user, sid)
    world.chain.time_travel(WINDOW + 5)
    for method in METHODS:  # the host is too late with a newer receipt
        rejected(
            world,
            "JobMarketplace: session deadline passed",
            lambda m=method: checkpoint(
                world, m, world.host, sid, (0, 500), sign(world, signer, sid, 0, 500)
            ),
            sid,
        )
    stranger = world.funded_sender("stranger")
    user_before = c.token.balance_of(world.user.address)
    settled = mp.finalize(stranger, sid)
    expected = settlement_split(DEPOSIT, 150, 400, INPUT_PRICE, PRICE, 1000)
    assert (
        settled.input_tokens,
        settled.output_tokens,
        settled.host_amount,
        settled.fee,
        settled.refund,
    ) == (
        150,
        400,
        expected.host,
        expected.fee,
        expected.refund,
    )
    assert c.token.balance_of(world.user.address) == user_before + expected.refund
    assert c.earnings.balance_of(world.host.address, c.token.address) == expected.host
    assert mp.treasury_balance() == expected.fee
    assert c.token.balance_of(stranger.address) == 0
    assert mp.open_deposits() == 0


def test_fee_is_snapshotted_at_creation(world: DevWorld) -> None:
    mp = world.contracts.marketplace
    old, old_signer = open_session(world)
    mp.set_fee_bps(world.owner, 2000)
    new, new_signer = open_session(world)
    assert (mp.get_session(old).fee_bps, mp.get_session(new).fee_bps) == (1000, 2000)
    gross = cost(0, 500, INPUT_PRICE, PRICE)
    settled_old = mp.complete_session(
        world.host, old, 0, 500, PROOF, URI, sign(world, old_signer, old, 0, 500)
    )
    settled_new = mp.complete_session(
        world.host, new, 0, 500, PROOF, URI, sign(world, new_signer, new, 0, 500)
    )
    assert (settled_old.fee, settled_old.host_amount) == (gross // 10, gross - gross // 10)
    assert (settled_new.fee, settled_new.host_amount) == (gross // 5, gross - gross // 5)
    assert mp.treasury_balance() == gross // 10 + gross // 5


def test_refund_to_blocked_depositor_is_credited(world: DevWorld) -> None:
    c = world.contracts
    mp = c.marketplace
    sid, signer = open_session(world)
    c.token.set_blocked(world.owner, world.user.address, True)
    user_before = c.token.balance_of(world.user.address)
    settled = mp.complete_session(
        world.host, sid, 0, 250, PROOF, URI, sign(world, signer, sid, 0, 250)
    )
    expected = settlement_split(DEPOSIT, 0, 250, INPUT_PRICE, PRICE, 1000)
    assert settled.refund_credited
    assert (settled.host_amount, settled.fee, settled.refund) == (
        expected.host,
        expected.fee,
        expected.refund,
    )
    assert mp.get_session(sid).is_settled
    assert mp.refund_credit(world.user.address) == expected.refund
    assert c.token.balance_of(world.user.address) == user_before
    assert c.earnings.balance_of(world.host.address, c.token.address) == expected.host
    assert c.token.balance_of(mp.address) == expected.refund + expected.fee

    rejected(world, "TestUSDC: receiver is blocked", lambda: mp.withdraw_refund(world.user))

    c.token.set_blocked(world.owner, world.user.address, False)
    mp.withdraw_refund(world.user)
    assert c.token.balance_of(world.user.address) == user_before + expected.refund
    assert mp.refund_credit(world.user.address) == 0
    assert c.token.balance_of(mp.address) == expected.fee
    rejected(world, "JobMarketplace: no refund to withdraw", lambda: mp.withdraw_refund(world.user))


# Withdrawals and admin -------------------------------------------------------------


def test_withdraw_refund_rejects_nothing_owed(world: DevWorld) -> None:
    mp = world.contracts.marketplace
    with unchanged(world):
        for caller in (world.user, world.host, world.owner):
            with reverts("JobMarketplace: no refund to withdraw"):
                mp.withdraw_refund(caller)


def test_withdraw_treasury_rejects_non_treasury_and_zero_balance(world: DevWorld) -> None:
    c = world.contracts
    mp = c.marketplace
    assert view(world, "treasury") == world.owner.address
    rejected(
        world, "JobMarketplace: treasury balance is zero", lambda: mp.withdraw_treasury(world.owner)
    )
    sid, signer = open_session(world)
    mp.complete_session(world.host, sid, 0, 500, PROOF, URI, sign(world, signer, sid, 0, 500))
    fee = mp.treasury_balance()
    assert fee > 0
    with unchanged(world):
        for caller in (world.user, world.host):
            with reverts("JobMarketplace: caller is not the treasury"):
                mp.withdraw_treasury(caller)
    new_treasury = world.funded_sender("new treasury")
    mp.set_treasury(world.owner, new_treasury.address)
    rejected(
        world,
        "JobMarketplace: caller is not the treasury",
        lambda: mp.withdraw_treasury(world.owner),
    )
    mp.withdraw_treasury(new_treasury)
    assert c.token.balance_of(new_treasury.address) == fee
    rejected(
        world,
        "JobMarketplace: treasury balance is zero",
        lambda: mp.withdraw_treasury(new_treasury),
    )


def test_set_fee_bps_rejects_non_owner_and_fee_above_maximum(world: DevWorld) -> None:
    mp = world.contracts.marketplace
    for caller in (world.user, world.host):
        with reverts("JobMarketplace: caller is not the owner"):
            mp.set_fee_bps(caller, 0)
    for fee in (2001, 10_000):
        with reverts("JobMarketplace: fee above maximum"):
            mp.set_fee_bps(world.owner, fee)
    assert mp.fee_bps() == 1000
    mp.set_fee_bps(world.owner, 2000)
    assert mp.fee_bps() == 2000
    mp.set_fee_bps(world.owner, 0)
    assert mp.fee_bps() == 0


def test_set_treasury_rejects_non_owner_and_zero_address(world: DevWorld) -> None:
    mp = world.contracts.marketplace
    with reverts("JobMarketplace: caller is not the owner"):
        mp.set_treasury(world.user, world.user.address)
    with reverts("JobMarketplace: treasury is the zero address"):
        mp.set_treasury(world.owner, ZERO)
    assert view(world, "treasury") == world.owner.address
    mp.set_treasury(world.owner, world.user.address)
    assert view(world, "treasury") == world.user.address


def test_transfer_ownership_rejects_non_owner_and_zero_address(world: DevWorld) -> None:
    mp = world.contracts.marketplace
    fns = mp.contract.functions
    with reverts("JobMarketplace: caller is not the owner"):
        world.user.transact(fns.transfer_ownership(world.user.address))
    with reverts("JobMarketplace: new owner is the zero address"):
        world.owner.transact(fns.transfer_ownership(ZERO))
    assert view(world, "owner") == world.owner.address
    new_owner = world.funded_sender("new owner")
    world.owner.transact(fns.transfer_ownership(new_owner.address))
    assert view(world, "owner") == new_owner.address
    for action in (
        lambda: mp.set_fee_bps(world.owner, 5),
        lambda: mp.set_treasury(world.owner, world.owner.address),
        lambda: world.owner.transact(fns.transfer_ownership(world.owner.address)),
    ):
        with reverts("JobMarketplace: caller is not the owner"):
            action()
    mp.set_fee_bps(new_owner, 5)
    assert mp.fee_bps() == 5


# A payment token that returns False instead of reverting ----------------------------


def test_token_transfers_returning_false_revert_or_are_credited(world: DevWorld) -> None:
    token = deploy_failing_token(world)
    c = deploy(world.chain, world.owner, DeployParams(token=token.address))
    mp = c.marketplace

    def failing(on: bool) -> None:
        world.owner.transact(token.functions.set_failing(on))

    def balance(address: str) -> int:
        return token.functions.balanceOf(address).call()

    model = c.models.approve_model(world.owner, "m", keccak(text="m"))
    stake = 2 * 3 * DEPOSIT  # covers the three sessions' exposure
    world.owner.transact(token.functions.mint(world.host.address, stake))
    c.nodes.register(world.host, "ws://failing", {model: (INPUT_PRICE, PRICE)}, stake)
    world.owner.transact(token.functions.mint(world.user.address, 3 * DEPOSIT))
    signer = Account.create()
    args = create_args(world, model_id=model, session_signer=signer.address)
    paid, refunded = (mp.create_session(world.user, **args) for _ in range(2))
    receipt = Receipt(paid, 100, 500, PROOF)
    sig = sign_receipt(signer.key, mp.domain(), receipt)

    failing(True)
    with reverts("JobMarketplace: deposit transfer failed"):
        mp.create_session(world.user, **args)
    with reverts("JobMarketplace: host payout transfer failed"):
        mp.complete_session(world.host, paid, 100, 500, PROOF, URI, sig)
    assert mp.get_session(paid).is_open
    assert mp.open_deposits() == 2 * DEPOSIT
    # The refund push may fail without blocking settlement (nothing owed to the host).
    settled = mp.complete_session(world.host, refunded, 0, 0, PROOF, URI, b"")
    assert settled.refund_credited
    assert mp.refund_credit(world.user.address) == DEPOSIT
    with reverts("JobMarketplace: refund transfer failed"):
        mp.withdraw_refund(world.user)
    assert mp.refund_credit(world.user.address) == DEPOSIT

    failing(False)
    fee = mp.complete_session(world.host, paid, 100, 500, PROOF, URI, sig).fee
    assert fee > 0
    failing(True)
    with reverts("JobMarketplace: treasury transfer failed"):
        mp.withdraw_treasury(world.owner)
    assert mp.treasury_balance() == fee

    failing(False)
    user_before = balance(world.user.address)
    mp.withdraw_refund(world.user)
    assert balance(world.user.address) == user_before + DEPOSIT
    mp.withdraw_treasury(world.owner)
    assert mp.treasury_balance() == 0
    assert balance(mp.address) == 0


# Views -----------------------------------------------------------------------------


def test_session_index_pagination(world: DevWorld) -> None:
    cover_exposure(world, usdc("25000"))
    mp = world.contracts.marketplace
    other = world.funded_sender("other user", usdc("10"))
    u1 = open_session(world)[0]
    o1 = open_session(world, user=other)[0]
    u2 = open_session(world)[0]
    u3 = open_session(world)[0]
    user, host = world.user.address, world.host.address
    # Newest first; the cursor is the last id of the previous page.
    assert mp.sessions_of_user(user) == [u3, u2, u1]
    assert mp.sessions_of_user(user, 0, 2) == [u3, u2]
    assert mp.sessions_of_user(user, u2, 2) == [u1]
    assert mp.sessions_of_user(user, u3, 1) == [u2]
    assert mp.sessions_of_user(user, u1, 10) == []
    assert mp.sessions_of_user(user, 0, 0) == []
    assert mp.sessions_of_user(user, 0, 10**9) == [u3, u2, u1]
    assert mp.sessions_of_user(other.address) == [o1]
    assert mp.sessions_of_user(host) == []
    assert mp.sessions_of_host(host) == [u3, u2, o1, u1]
    assert mp.sessions_of_host(host, 0, 1) == [u3]
    assert mp.sessions_of_host(host, u3, 2) == [u2, o1]
    assert mp.sessions_of_host(host, o1, 2) == [u1]
    assert mp.sessions_of_host(user) == []
    # Settling does not drop a session from the indexes.
    world.chain.time_travel(86400 + WINDOW + 1)
    mp.finalize(world.owner, u2)
    assert mp.sessions_of_user(user) == [u3, u2, u1]


def test_session_index_rejects_foreign_cursor(world: DevWorld) -> None:
    mp = world.contracts.marketplace
    other = world.funded_sender("other user", usdc("10"))
    mine = open_session(world)[0]
    theirs = open_session(world, user=other)[0]
    user, host = world.user.address, world.host.address
    for cursor in (theirs, 999):
        with reverts("JobMarketplace: cursor is not a session of this user"):
            mp.sessions_of_user(user, cursor, 10)
    with reverts("JobMarketplace: cursor is not a session of this host"):
        mp.sessions_of_host(user, mine, 10)
    with reverts("JobMarketplace: cursor is not a session of this host"):
        mp.sessions_of_host(host, 999, 10)
    assert mp.sessions_of_user(other.address, theirs, 10) == []


# Constructor -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"treasury": ZERO}, "treasury is the zero address"),
        ({"fee": 2001}, "fee above maximum"),
        ({"min": 0}, "bad deposit bounds"),
        ({"min": 10, "max": 9}, "bad deposit bounds"),
        ({"max": 2**96}, "bad deposit bounds"),
        ({"window": 0}, "zero close window"),
    ],
    ids=lambda v: v if isinstance(v, str) else ",".join(v),
)
def test_constructor_rejects_bad_parameters(
    world: DevWorld, changes: dict[str, Any], reason: str
) -> None:
    c = world.contracts
    args = {
        "treasury": world.owner.address,
        "fee": 1000,
        "min": 10_000,
        "max": 10_000 * 10**6,
        "window": WINDOW,
    } | changes
    compiled = compile_all()["JobMarketplace"]
    factory = world.chain.w3.eth.contract(abi=compiled.abi, bytecode=compiled.bytecode)
    constructor = factory.constructor(
        c.token.address,
        c.nodes.address,
        c.models.address,
        c.earnings.address,
        args["treasury"],
        args["fee"],
        args["min"],
        args["max"],
        args["window"],
    )
    with reverts(f"JobMarketplace: {reason}"):
        world.owner.transact(constructor, "deploy JobMarketplace")


# Bounds of the packed session storage (a deployment allowing deposits up to 2**96 - 1) --


BIG = 2**96 - 1
MAX_PRICE = 2**80 - 1


def big_deployment(
    world: DevWorld, prices: dict[str, tuple[int, int]]
) -> tuple[Contracts, dict[str, bytes]]:
    """A second full deployment with ``max_deposit = 2**96 - 1`` and the host serving
    one model per entry of ``prices``; returns the contracts and the model ids."""
    c = deploy(world.chain, world.owner, DeployParams(max_deposit=BIG))
    models = {name: c.models.approve_model(world.owner, name, keccak(text=name)) for name in prices}
    stake = 2 * BIG  # a host's exposure is capped at half its stake
    c.token.mint(world.host, world.host.address, stake)
    c.token.approve(world.host, c.nodes.address, stake)
    c.nodes.register(
        world.host, "ws://big", {models[name]: price for name, price in prices.items()}, stake
    )
    c.token.mint(world.user, world.user.address, BIG)
    c.token.approve(world.user, c.marketplace.address, 2**256 - 1)
    return c, models


def test_create_session_rejects_prices_that_do_not_fit_storage(world: DevWorld) -> None:
    c, models = big_deployment(
        world,
        {
            "input too big": (MAX_PRICE + 1, 1),
            "output too big": (0, MAX_PRICE + 1),
            "largest": (MAX_PRICE, MAX_PRICE),
        },
    )
    args = create_args(
        world,
        deposit=BIG,
        max_input_price_per_mtok=2**256 - 1,
        max_output_price_per_mtok=2**256 - 1,
        proof_interval=10,
    )
    for model, which in [("input too big", "input"), ("output too big", "output")]:
        with reverts(f"JobMarketplace: host {which} price too large"):
            c.marketplace.create_session(world.user, **(args | {"model_id": models[model]}))
    assert c.marketplace.open_deposits() == 0
    sid = c.marketplace.create_session(world.user, **(args | {"model_id": models["largest"]}))
    session = c.marketplace.get_session(sid)
    # Every packed field reads back exactly next to its neighbours at their maxima.
    assert (session.deposit, session.input_price_per_mtok, session.output_price_per_mtok) == (
        BIG,
        MAX_PRICE,
        MAX_PRICE,
    )
    assert session.is_open


def test_receipted_tokens_are_stored_exactly_or_refused(world: DevWorld) -> None:
    # At a price of 1 base unit per Mtok a deposit below 2**96 buys up to ~2**116
    # tokens of either kind, but the packed state keeps each count in 72 bits.
    c, models = big_deployment(world, {"cheap": (1, 1)})
    signer = Account.create()
    sid = c.marketplace.create_session(
        world.user,
        **create_args(
            world,
            model_id=models["cheap"],
            deposit=BIG,
            max_input_price_per_mtok=1,
            max_output_price_per_mtok=1,
            session_signer=signer.address,
        ),
    )
    market = c.marketplace
    largest = 2**72 - 1
    for tokens in [(largest + 1, 0), (0, largest + 1), (2**100, 2**100)]:
        # Within budget, so only the width check can refuse it.
        assert cost(*tokens, 1, 1) <= BIG
        sig = sign_receipt(signer.key, market.domain(), Receipt(sid, *tokens, PROOF))
        with reverts("JobMarketplace: tokens too large"):
            market.submit_checkpoint(world.host, sid, *tokens, PROOF, URI, sig)
    assert market.get_session(sid).checkpoints == 0
    # The largest counts are stored exactly, each next to the other.
    for tokens in [(largest, 5), (largest, largest)]:
        sig = sign_receipt(signer.key, market.domain(), Receipt(sid, *tokens, PROOF))
        market.submit_checkpoint(world.host, sid, *tokens, PROOF, URI, sig)
        session = market.get_session(sid)
        assert (session.input_tokens_paid, session.output_tokens_paid) == tokens
        assert session.is_open and session.proof_interval == 100
