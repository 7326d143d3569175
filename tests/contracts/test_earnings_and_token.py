"""Every revert path of HostEarnings and TestUSDC, plus the state around them."""

from __future__ import annotations

from dataclasses import dataclass

from web3.contract import Contract

from inferledger.chain.contracts import HostEarnings, Token
from inferledger.chain.devchain import DevWorld
from inferledger.chain.tx import TxSender
from inferledger.chain.units import usdc
from support import PROOF, URI, deploy_contract, deploy_failing_token, open_session, reverts, sign

ZERO = "0x0000000000000000000000000000000000000000"
MAX_UINT = 2**256 - 1


@dataclass
class Ledger:
    """A fresh HostEarnings whose marketplace is a plain test account."""

    earnings: HostEarnings
    marketplace: TxSender

    def fund_and_credit(self, token: Contract, host: str, amount: int) -> None:
        """What the marketplace does: move tokens in, then credit them."""
        self.marketplace.transact(token.functions.mint(self.earnings.address, amount))
        self.marketplace.transact(
            self.earnings.contract.functions.credit(host, token.address, amount)
        )


def fresh_ledger(world: DevWorld) -> Ledger:
    contract = deploy_contract(world, "HostEarnings")
    marketplace = world.funded_sender("fake marketplace")
    world.owner.transact(contract.functions.set_marketplace(marketplace.address))
    return Ledger(HostEarnings(world.chain, contract), marketplace)


def second_usdc(world: DevWorld) -> Contract:
    return deploy_contract(world, "TestUSDC")


# HostEarnings ----------------------------------------------------------------------


def test_earnings_set_marketplace(world: DevWorld) -> None:
    c = world.contracts
    fn = c.earnings.contract.functions
    with reverts("HostEarnings: caller is not the owner"):
        world.host.transact(fn.set_marketplace(world.host.address))
    with reverts("HostEarnings: marketplace already set"):
        world.owner.transact(fn.set_marketplace(world.host.address))
    assert fn.marketplace().call() == c.marketplace.address
    fresh = deploy_contract(world, "HostEarnings").functions
    with reverts("HostEarnings: caller is not the owner"):
        world.host.transact(fresh.set_marketplace(world.host.address))
    with reverts("HostEarnings: marketplace is the zero address"):
        world.owner.transact(fresh.set_marketplace(ZERO))
    assert fresh.marketplace().call() == ZERO
    world.owner.transact(fresh.set_marketplace(world.host.address))
    assert fresh.marketplace().call() == world.host.address


def test_credit_is_marketplace_only(world: DevWorld) -> None:
    c = world.contracts
    token = c.token.address
    for caller in (world.owner, world.host):
        with reverts("HostEarnings: caller is not the marketplace"):
            caller.transact(c.earnings.contract.functions.credit(world.host.address, token, 1))
    assert c.earnings.balance_of(world.host.address, token) == 0
    ledger = fresh_ledger(world)
    credit = ledger.earnings.contract.functions.credit(world.host.address, token, 1)
    with reverts("HostEarnings: caller is not the marketplace"):
        world.owner.transact(credit)
    # The named marketplace may, and credits add up.
    ledger.fund_and_credit(c.token.contract, world.host.address, 5)
    ledger.fund_and_credit(c.token.contract, world.host.address, 7)
    assert ledger.earnings.balance_of(world.host.address, token) == 12


def test_withdraw_with_nothing_to_withdraw(world: DevWorld) -> None:
    c = world.contracts
    with reverts("HostEarnings: nothing to withdraw"):
        c.earnings.withdraw(world.host, c.token.address)
    # After a settlement the host withdraws once; a second withdrawal has nothing left.
    session_id, signer = open_session(world)
    c.marketplace.complete_session(
        world.host, session_id, 20, 100, PROOF, URI, sign(world, signer, session_id, 20, 100)
    )
    earned = c.earnings.balance_of(world.host.address, c.token.address)
    assert earned > 0
    before = c.token.balance_of(world.host.address)
    c.earnings.withdraw(world.host, c.token.address)
    assert c.token.balance_of(world.host.address) == before + earned
    assert c.earnings.balance_of(world.host.address, c.token.address) == 0
    with reverts("HostEarnings: nothing to withdraw"):
        c.earnings.withdraw(world.host, c.token.address)
    # Other accounts never had anything.
    with reverts("HostEarnings: nothing to withdraw"):
        c.earnings.withdraw(world.user, c.token.address)


def test_withdraw_many_over_two_tokens(world: DevWorld) -> None:
    ledger = fresh_ledger(world)
    usdc_a, usdc_b = world.contracts.token.contract, second_usdc(world)
    host = world.host.address
    ledger.fund_and_credit(usdc_a, host, 300)
    ledger.fund_and_credit(usdc_b, host, 40)
    ledger.fund_and_credit(usdc_b, world.user.address, 2)
    tokens = [usdc_a.address, usdc_b.address]
    a_before = usdc_a.functions.balanceOf(host).call()
    fn = ledger.earnings.contract.functions.withdraw_many(tokens)
    assert fn.call({"from": host}) == [300, 40]
    ledger.earnings.withdraw_many(world.host, tokens)
    assert usdc_a.functions.balanceOf(host).call() == a_before + 300
    assert usdc_b.functions.balanceOf(host).call() == 40
    assert [ledger.earnings.balance_of(host, t) for t in tokens] == [0, 0]
    # Someone else's balance is untouched.
    assert ledger.earnings.balance_of(world.user.address, usdc_b.address) == 2
    assert usdc_b.functions.balanceOf(ledger.earnings.address).call() == 2
    with reverts("HostEarnings: nothing to withdraw"):
        ledger.earnings.withdraw_many(world.host, tokens)


def test_withdraw_many_with_one_empty_token_reverts_whole(world: DevWorld) -> None:
    ledger = fresh_ledger(world)
    usdc_a, usdc_b = world.contracts.token.contract, second_usdc(world)
    host = world.host.address
    ledger.fund_and_credit(usdc_a, host, 300)
    a_before = usdc_a.functions.balanceOf(host).call()
    for tokens in ([usdc_a.address, usdc_b.address], [usdc_b.address, usdc_a.address]):
        with reverts("HostEarnings: nothing to withdraw"):
            ledger.earnings.withdraw_many(world.host, tokens)
    # The non-empty token was neither paid out nor cleared.
    assert ledger.earnings.balance_of(host, usdc_a.address) == 300
    assert usdc_a.functions.balanceOf(host).call() == a_before
    assert usdc_a.functions.balanceOf(ledger.earnings.address).call() == 300
    ledger.earnings.withdraw_many(world.host, [usdc_a.address])
    assert usdc_a.functions.balanceOf(host).call() == a_before + 300


def test_withdraw_to_blocked_host_reverts_and_keeps_balance(world: DevWorld) -> None:
    c = world.contracts
    ledger = fresh_ledger(world)
    host = world.host.address
    ledger.fund_and_credit(c.token.contract, host, 500)
    c.token.set_blocked(world.owner, host, True)
    before = c.token.balance_of(host)
    with reverts("TestUSDC: receiver is blocked"):
        ledger.earnings.withdraw(world.host, c.token.address)
    with reverts("TestUSDC: receiver is blocked"):
        ledger.earnings.withdraw_many(world.host, [c.token.address])
    assert ledger.earnings.balance_of(host, c.token.address) == 500
    c.token.set_blocked(world.owner, host, False)
    ledger.earnings.withdraw(world.host, c.token.address)
    assert c.token.balance_of(host) == before + 500


def test_withdraw_token_returning_false_reverts(world: DevWorld) -> None:
    ledger = fresh_ledger(world)
    token = deploy_failing_token(world)
    host = world.host.address
    ledger.fund_and_credit(token, host, 500)
    world.owner.transact(token.functions.set_failing(True))
    with reverts("HostEarnings: transfer failed"):
        ledger.earnings.withdraw(world.host, token.address)
    with reverts("HostEarnings: transfer failed"):
        ledger.earnings.withdraw_many(world.host, [token.address])
    assert ledger.earnings.balance_of(host, token.address) == 500
    world.owner.transact(token.functions.set_failing(False))
    ledger.earnings.withdraw(world.host, token.address)
    assert token.functions.balanceOf(host).call() == 500
    assert ledger.earnings.balance_of(host, token.address) == 0


# TestUSDC ------------------------------------------------------------------------------


def spender_of(world: DevWorld) -> TxSender:
    return world.funded_sender("spender")


def transfer_from(token: Token, spender: TxSender, sender: str, to: str, amount: int) -> None:
    spender.transact(token.contract.functions.transferFrom(sender, to, amount))


def test_transfer_from_allowance_too_low(world: DevWorld) -> None:
    token = world.contracts.token
    spender = spender_of(world)
    user, to = world.user.address, spender.address
    with reverts("TestUSDC: allowance too low"):
        transfer_from(token, spender, user, to, 1)
    token.approve(world.user, spender.address, 5)
    with reverts("TestUSDC: allowance too low"):
        transfer_from(token, spender, user, to, 6)
    assert token.allowance(user, spender.address) == 5
    assert (token.balance_of(user), token.balance_of(to)) == (usdc("100"), 0)
    transfer_from(token, spender, user, to, 5)
    assert token.allowance(user, spender.address) == 0
    assert (token.balance_of(user), token.balance_of(to)) == (usdc("100") - 5, 5)


def test_balance_too_low(world: DevWorld) -> None:
    token = world.contracts.token
    spender = spender_of(world)
    user = world.user.address
    with reverts("TestUSDC: balance too low"):
        token.transfer(world.user, spender.address, usdc("100") + 1)
    token.approve(world.user, spender.address, usdc("200"))
    with reverts("TestUSDC: balance too low"):
        transfer_from(token, spender, user, spender.address, usdc("100") + 1)
    # The failed transferFrom did not spend the allowance.
    assert token.allowance(user, spender.address) == usdc("200")
    assert token.balance_of(user) == usdc("100")
    token.transfer(world.user, spender.address, usdc("100"))
    assert (token.balance_of(user), token.balance_of(spender.address)) == (0, usdc("100"))


def test_transfer_to_zero_address(world: DevWorld) -> None:
    token = world.contracts.token
    spender = spender_of(world)
    supply = token.contract.functions.totalSupply().call()
    with reverts("TestUSDC: transfer to zero address"):
        token.transfer(world.user, ZERO, 1)
    token.approve(world.user, spender.address, 10)
    with reverts("TestUSDC: transfer to zero address"):
        transfer_from(token, spender, world.user.address, ZERO, 1)
    assert token.allowance(world.user.address, spender.address) == 10
    assert token.balance_of(world.user.address) == usdc("100")
    assert token.contract.functions.totalSupply().call() == supply


def test_mint_to_zero_address(world: DevWorld) -> None:
    token = world.contracts.token
    supply = token.contract.functions.totalSupply().call()
    with reverts("TestUSDC: mint to zero address"):
        token.mint(world.user, ZERO, 1)
    assert token.contract.functions.totalSupply().call() == supply
    token.mint(world.user, world.user.address, 7)
    assert token.contract.functions.totalSupply().call() == supply + 7
    assert token.balance_of(world.user.address) == usdc("100") + 7


def test_set_blocked_is_owner_only(world: DevWorld) -> None:
    token = world.contracts.token
    blocked = token.contract.functions.blocked
    with reverts("TestUSDC: caller is not the owner"):
        token.set_blocked(world.host, world.user.address, True)
    assert not blocked(world.user.address).call()
    token.set_blocked(world.owner, world.user.address, True)
    assert blocked(world.user.address).call()
    with reverts("TestUSDC: caller is not the owner"):
        token.set_blocked(world.user, world.user.address, False)
    assert blocked(world.user.address).call()


def test_blocked_sender_and_receiver(world: DevWorld) -> None:
    token = world.contracts.token
    spender = spender_of(world)
    user, host = world.user.address, world.host.address
    token.approve(world.user, spender.address, usdc("1"))
    token.set_blocked(world.owner, user, True)
    with reverts("TestUSDC: sender is blocked"):
        token.transfer(world.user, host, 1)
    with reverts("TestUSDC: sender is blocked"):
        transfer_from(token, spender, user, host, 1)
    with reverts("TestUSDC: receiver is blocked"):
        token.transfer(world.host, user, 1)
    token.approve(world.host, spender.address, usdc("1"))
    with reverts("TestUSDC: receiver is blocked"):
        transfer_from(token, spender, host, user, 1)
    assert token.balance_of(user) == usdc("100")
    assert token.allowance(user, spender.address) == usdc("1")
    assert token.allowance(host, spender.address) == usdc("1")
    # Unblocking restores both directions.
    token.set_blocked(world.owner, user, False)
    token.transfer(world.user, host, 1)
    token.transfer(world.host, user, 2)
    assert token.balance_of(user) == usdc("100") + 1


def test_infinite_allowance_is_not_decremented(world: DevWorld) -> None:
    token = world.contracts.token
    spender = spender_of(world)
    user = world.user.address
    token.approve(world.user, spender.address, MAX_UINT)
    transfer_from(token, spender, user, spender.address, usdc("3"))
    transfer_from(token, spender, user, spender.address, usdc("4"))
    assert token.allowance(user, spender.address) == MAX_UINT
    assert token.balance_of(spender.address) == usdc("7")
    # One below infinite is an ordinary allowance.
    token.approve(world.user, spender.address, MAX_UINT - 1)
    transfer_from(token, spender, user, spender.address, 1)
    assert token.allowance(user, spender.address) == MAX_UINT - 2
