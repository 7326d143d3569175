"""EIP-712 receipts: only the session signer's receipt for this session, chain and
marketplace, for more tokens than already paid (input and output counts, neither
going down), ever pays; and the Python side computes the same digest as the contract."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak

from inferledger.chain.devchain import DevWorld
from inferledger.chain.errors import ContractRevert
from inferledger.chain.receipts import (
    Receipt,
    ReceiptDomain,
    receipt_digest,
    recover_receipt_signer,
    sign_receipt,
)
from inferledger.chain.units import settlement_split, usdc
from support import INPUT_PRICE, PRICE, PROOF, URI, open_session, sign

METHODS = ["submit_checkpoint", "complete_session"]
NOT_SIGNER = "JobMarketplace: receipt not signed by session signer"
NOT_MORE = "JobMarketplace: tokens must increase"
DECREASES = "JobMarketplace: tokens must not decrease"
IN, OUT = 120, 300  # the cumulative (input, output) counts most tests receipt


@contextmanager
def reverts(reason: str) -> Iterator[None]:
    with pytest.raises(ContractRevert) as info:
        yield
    assert info.value.reason == reason


def ledger(world: DevWorld, *session_ids: int) -> dict[str, Any]:
    """Balances and per-session payment state that a paying receipt would move."""
    c = world.contracts
    mp = c.marketplace
    sessions = [mp.get_session(i) for i in session_ids]
    return {
        "user": c.token.balance_of(world.user.address),
        "marketplace": c.token.balance_of(mp.address),
        "host_earnings": c.earnings.balance_of(world.host.address, c.token.address),
        "treasury_balance": mp.treasury_balance(),
        "refund_credit": mp.refund_credit(world.user.address),
        "open_deposits": mp.open_deposits(),
        "paid": [
            (s.input_tokens_paid, s.output_tokens_paid, s.checkpoints, s.proof_hash, s.status)
            for s in sessions
        ],
    }


def never_pays(world: DevWorld, reason: str, pay: Callable[[], Any], *session_ids: int) -> None:
    """``pay`` reverts with ``reason`` and moves no money and no paid count."""
    before = ledger(world, *session_ids)
    with reverts(reason):
        pay()
    assert ledger(world, *session_ids) == before


def submit(
    world: DevWorld,
    method: str,
    sid: int,
    tokens: tuple[int, int],
    sig: bytes,
    proof: bytes = PROOF,
) -> Any:
    """Submit (or complete with) the receipt ``sig`` for (input, output) ``tokens``."""
    marketplace = world.contracts.marketplace
    return getattr(marketplace, method)(world.host, sid, *tokens, proof, URI, sig)


def signed(signer: LocalAccount, domain: ReceiptDomain, sid: int, tokens: tuple[int, int]) -> bytes:
    return sign_receipt(signer.key, domain, Receipt(sid, *tokens, PROOF))


def paid(world: DevWorld, sid: int) -> tuple[int, int]:
    session = world.contracts.marketplace.get_session(sid)
    return session.input_tokens_paid, session.output_tokens_paid


# Receipts that must never pay ------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_receipt_for_another_session_never_pays(world: DevWorld, method: str) -> None:
    mp = world.contracts.marketplace
    signer = Account.create()
    first, _ = open_session(world, signer=signer)
    second, _ = open_session(world, signer=signer)  # same key signs both sessions
    for_first = sign(world, signer, first, IN, OUT)
    never_pays(
        world,
        NOT_SIGNER,
        lambda: submit(world, method, second, (IN, OUT), for_first),
        first,
        second,
    )
    submit(world, method, first, (IN, OUT), for_first)  # it does pay where it belongs
    assert paid(world, first) == (IN, OUT)
    assert mp.get_session(second).checkpoints == 0 and paid(world, second) == (0, 0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("other", ["chain id", "contract address", "both"])
def test_receipt_for_another_domain_never_pays(world: DevWorld, method: str, other: str) -> None:
    c = world.contracts
    sid, signer = open_session(world)
    domain = c.marketplace.domain()
    chain_id = domain.chain_id + 1 if other != "contract address" else domain.chain_id
    address = c.nodes.address if other != "chain id" else domain.marketplace
    foreign = ReceiptDomain(chain_id=chain_id, marketplace=address)
    assert foreign != domain
    sig = signed(signer, foreign, sid, (IN, OUT))
    never_pays(world, NOT_SIGNER, lambda: submit(world, method, sid, (IN, OUT), sig), sid)
    submit(world, method, sid, (IN, OUT), signed(signer, domain, sid, (IN, OUT)))
    assert paid(world, sid) == (IN, OUT)


def test_receipt_from_a_marketplace_deployed_elsewhere_never_pays(world: DevWorld) -> None:
    # The same session id and signer on a twin marketplace: its receipts stay there.
    from inferledger.chain.deploy import deploy

    twin = deploy(world.chain, world.owner).marketplace
    sid, signer = open_session(world)
    assert twin.domain() != world.contracts.marketplace.domain()
    sig = signed(signer, twin.domain(), sid, (IN, OUT))
    for method in METHODS:
        never_pays(world, NOT_SIGNER, lambda m=method: submit(world, m, sid, (IN, OUT), sig), sid)


@pytest.mark.parametrize("method", METHODS)
def test_receipt_signed_by_another_key_never_pays(world: DevWorld, method: str) -> None:
    sid, signer = open_session(world)
    # A stranger, the host itself and the depositor's own account are not the session signer.
    for key in (Account.create(), world.host.account, world.user.account):
        sig = sign(world, key, sid, IN, OUT)
        never_pays(world, NOT_SIGNER, lambda s=sig: submit(world, method, sid, (IN, OUT), s), sid)
    submit(world, method, sid, (IN, OUT), sign(world, signer, sid, IN, OUT))
    assert paid(world, sid) == (IN, OUT)


@pytest.mark.parametrize("method", METHODS)
def test_receipt_for_other_tokens_or_proof_than_submitted_never_pays(
    world: DevWorld, method: str
) -> None:
    sid, signer = open_session(world)
    sig = sign(world, signer, sid, IN, OUT)
    # The wrong input count, the wrong output count, the counts swapped: all rejected.
    for tokens in [(IN + 1, OUT), (IN - 1, OUT), (0, OUT), (IN, OUT + 1), (IN, OUT - 1), (OUT, IN)]:
        never_pays(world, NOT_SIGNER, lambda t=tokens: submit(world, method, sid, t, sig), sid)
    other_proof = keccak(text="another bundle")
    never_pays(
        world, NOT_SIGNER, lambda: submit(world, method, sid, (IN, OUT), sig, other_proof), sid
    )
    submit(world, method, sid, (IN, OUT), sig)
    assert paid(world, sid) == (IN, OUT)


@pytest.mark.parametrize("method", METHODS)
def test_receipt_for_fewer_tokens_than_paid_never_pays(world: DevWorld, method: str) -> None:
    mp = world.contracts.marketplace
    sid, signer = open_session(world)
    mp.submit_checkpoint(world.host, sid, IN, OUT, PROOF, URI, sign(world, signer, sid, IN, OUT))
    # Genuinely signed but stale or lopsided: one count lower never pays, even when the
    # other one is higher (which would otherwise pay more in total).
    for tokens in [(IN, OUT - 1), (IN - 1, OUT), (0, 1), (IN - 1, OUT + 100), (IN + 100, OUT - 1)]:
        sig = sign(world, signer, sid, *tokens)
        never_pays(world, DECREASES, lambda t=tokens, s=sig: submit(world, method, sid, t, s), sid)
    assert paid(world, sid) == (IN, OUT)


def test_a_checkpoint_may_raise_either_count_alone(world: DevWorld) -> None:
    mp = world.contracts.marketplace
    sid, signer = open_session(world)
    for tokens in [(IN, 0), (IN, OUT), (IN + 50, OUT), (IN + 50, OUT + 1)]:
        mp.submit_checkpoint(
            world.host, sid, *tokens, PROOF, URI, sign(world, signer, sid, *tokens)
        )
        assert paid(world, sid) == tokens
    assert mp.get_session(sid).checkpoints == 4


def test_replayed_receipt_never_pays_twice(world: DevWorld) -> None:
    c = world.contracts
    mp = c.marketplace
    sid, signer = open_session(world)
    sig = sign(world, signer, sid, IN, OUT)
    mp.submit_checkpoint(world.host, sid, IN, OUT, PROOF, URI, sig)
    never_pays(
        world,
        NOT_MORE,
        lambda: mp.submit_checkpoint(world.host, sid, IN, OUT, PROOF, URI, sig),
        sid,
    )
    assert mp.get_session(sid).checkpoints == 1

    # Completing with the same receipt settles once, at the receipted counts.
    user_before = c.token.balance_of(world.user.address)
    settled = mp.complete_session(world.host, sid, IN, OUT, PROOF, URI, sig)
    expected = settlement_split(usdc("2"), IN, OUT, INPUT_PRICE, PRICE, 1000)
    assert expected.gross == (IN * INPUT_PRICE + OUT * PRICE) // 10**6
    assert (
        settled.input_tokens,
        settled.output_tokens,
        settled.host_amount,
        settled.fee,
        settled.refund,
    ) == (
        IN,
        OUT,
        expected.host,
        expected.fee,
        expected.refund,
    )
    assert c.earnings.balance_of(world.host.address, c.token.address) == expected.host
    assert c.token.balance_of(world.user.address) == user_before + expected.refund
    assert mp.get_session(sid).checkpoints == 1

    for method in METHODS:
        never_pays(
            world,
            "JobMarketplace: session not open",
            lambda m=method: submit(world, m, sid, (IN, OUT), sig),
            sid,
        )


def test_replay_on_a_later_session_of_the_same_signer_never_pays(world: DevWorld) -> None:
    mp = world.contracts.marketplace
    signer = Account.create()
    old, _ = open_session(world, signer=signer)
    old_sig = sign(world, signer, old, IN, OUT)
    mp.complete_session(world.host, old, IN, OUT, PROOF, URI, old_sig)
    new, _ = open_session(world, signer=signer)
    for method in METHODS:
        never_pays(
            world, NOT_SIGNER, lambda m=method: submit(world, m, new, (IN, OUT), old_sig), new
        )


# Python side and contract agree ----------------------------------------------------


def test_receipt_digest_matches_contract(world: DevWorld) -> None:
    mp = world.contracts.marketplace
    sid, _signer = open_session(world)
    domain = mp.domain()
    for session_id, input_tokens, output_tokens, proof in [
        (sid, IN, OUT, PROOF),
        (sid, 0, 0, b"\x00" * 32),
        (sid, 7, 0, PROOF),
        (2**256 - 1, 2**256 - 1, 2**256 - 2, b"\xff" * 32),
        (1, 1, 1, keccak(text="x")),
    ]:
        receipt = Receipt(session_id, input_tokens, output_tokens, proof)
        assert receipt_digest(domain, receipt) == mp.receipt_digest(
            session_id, input_tokens, output_tokens, proof
        )
    receipt = Receipt(sid, IN, OUT, PROOF)
    # Each count is bound separately: swapping them or moving tokens between them changes it.
    for other in [(OUT, IN), (IN + 1, OUT - 1), (0, IN + OUT)]:
        assert mp.receipt_digest(sid, *other, PROOF) != receipt_digest(domain, receipt)
    # The digest is bound to the domain: another chain id gives another digest.
    foreign = ReceiptDomain(chain_id=domain.chain_id + 1, marketplace=domain.marketplace)
    assert receipt_digest(foreign, receipt) != mp.receipt_digest(sid, IN, OUT, PROOF)


def test_receipt_rejects_negative_counts_and_bad_proof_hash() -> None:
    for bad in [(-1, 0, PROOF), (0, -1, PROOF), (0, 0, b"\x00" * 31)]:
        with pytest.raises(ValueError):
            Receipt(1, *bad)


def test_recover_receipt_signer_returns_the_signer(world: DevWorld) -> None:
    mp = world.contracts.marketplace
    sid, signer = open_session(world)
    domain = mp.domain()
    receipt = Receipt(session_id=sid, input_tokens=IN, output_tokens=OUT, proof_hash=PROOF)
    sig = sign_receipt(signer.key, domain, receipt)
    assert len(sig) == 65 and sig[64] in (27, 28)
    assert recover_receipt_signer(domain, receipt, sig) == signer.address
    # Any change to what was signed recovers someone else.
    for other_domain, other_receipt in [
        (domain, Receipt(sid, IN + 1, OUT, PROOF)),
        (domain, Receipt(sid, IN, OUT + 1, PROOF)),
        (domain, Receipt(sid + 1, IN, OUT, PROOF)),
        (domain, Receipt(sid, IN, OUT, keccak(text="other"))),
        (ReceiptDomain(domain.chain_id + 1, domain.marketplace), receipt),
        (ReceiptDomain(domain.chain_id, world.contracts.token.address), receipt),
    ]:
        assert recover_receipt_signer(other_domain, other_receipt, sig) != signer.address
    # And the contract agrees with the Python signer: the receipt pays exactly once.
    mp.submit_checkpoint(world.host, sid, IN, OUT, PROOF, URI, sig)
    session = mp.get_session(sid)
    assert (
        session.input_tokens_paid,
        session.output_tokens_paid,
        session.proof_hash,
        session.checkpoints,
    ) == (IN, OUT, PROOF, 1)
