# pragma version 0.4.3
# pragma evm-version cancun
"""
@title HostEarnings
@notice Pull ledger of what hosts have earned, per host and token. The
        marketplace transfers tokens in and credits them; a host withdraws
        whenever it likes, one token or several at once.
@license Apache-2.0
"""

from ethereum.ercs import IERC20

MAX_TOKENS: constant(uint256) = 8

event EarningsCredited:
    host: indexed(address)
    token: indexed(address)
    amount: uint256
    balance: uint256

event EarningsWithdrawn:
    host: indexed(address)
    token: indexed(address)
    amount: uint256

event MarketplaceSet:
    marketplace: indexed(address)

event OwnershipTransferred:
    previous_owner: indexed(address)
    new_owner: indexed(address)

owner: public(address)
marketplace: public(address)
balance_of: public(HashMap[address, HashMap[address, uint256]])


@deploy
def __init__():
    self.owner = msg.sender
    log OwnershipTransferred(previous_owner=empty(address), new_owner=msg.sender)


@external
def set_marketplace(marketplace: address):
    """
    @notice Name the marketplace allowed to credit earnings. Owner only, once.
    @param marketplace The JobMarketplace; not the zero address.
    """
    assert msg.sender == self.owner, "HostEarnings: caller is not the owner"
    assert self.marketplace == empty(address), "HostEarnings: marketplace already set"
    assert marketplace != empty(address), "HostEarnings: marketplace is the zero address"
    self.marketplace = marketplace
    log MarketplaceSet(marketplace=marketplace)


@external
def credit(host: address, token: address, amount: uint256):
    """
    @notice Record `amount` of `token` as earned by `host`.
    @dev Marketplace only, after it has transferred the tokens here.
    @param host Who earned the tokens.
    @param token The token transferred in.
    @param amount Base units of `token` to add to the host's balance.
    """
    assert msg.sender == self.marketplace, "HostEarnings: caller is not the marketplace"
    balance: uint256 = self.balance_of[host][token] + amount
    self.balance_of[host][token] = balance
    log EarningsCredited(host=host, token=token, amount=amount, balance=balance)


@external
@nonreentrant
def withdraw(token: address) -> uint256:
    """
    @notice Send the caller its whole balance of `token`.
    @param token The token to withdraw; the balance must be nonzero.
    @return The amount sent.
    """
    return self._withdraw(msg.sender, token)


@external
@nonreentrant
def withdraw_many(tokens: DynArray[address, MAX_TOKENS]) -> DynArray[uint256, MAX_TOKENS]:
    """
    @notice Send the caller its whole balance of each token in `tokens`.
    @param tokens Up to 8 tokens, each with a nonzero balance.
    @return The amounts sent, in the order of `tokens`.
    """
    amounts: DynArray[uint256, MAX_TOKENS] = []
    for token: address in tokens:
        amounts.append(self._withdraw(msg.sender, token))
    return amounts


@internal
def _withdraw(host: address, token: address) -> uint256:
    amount: uint256 = self.balance_of[host][token]
    assert amount > 0, "HostEarnings: nothing to withdraw"
    self.balance_of[host][token] = 0
    log EarningsWithdrawn(host=host, token=token, amount=amount)
    assert extcall IERC20(token).transfer(
        host, amount, default_return_value=True
    ), "HostEarnings: transfer failed"
    return amount
