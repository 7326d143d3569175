# pragma version 0.4.3
# pragma evm-version cancun
"""
@title TestUSDC
@notice A 6-decimal ERC20 for dev chains only: anyone may mint. The owner can
        block an address the way USDC's blacklist does, so tests can exercise a
        refund transfer that fails.
@license Apache-2.0
"""

from ethereum.ercs import IERC20

implements: IERC20

event Transfer:
    sender: indexed(address)
    receiver: indexed(address)
    value: uint256

event Approval:
    owner: indexed(address)
    spender: indexed(address)
    value: uint256

event BlockedSet:
    account: indexed(address)
    blocked: bool

event OwnershipTransferred:
    previous_owner: indexed(address)
    new_owner: indexed(address)

name: public(constant(String[32])) = "Test USD Coin"
symbol: public(constant(String[8])) = "USDC"
decimals: public(constant(uint8)) = 6

balanceOf: public(HashMap[address, uint256])
allowance: public(HashMap[address, HashMap[address, uint256]])
totalSupply: public(uint256)
owner: public(address)
blocked: public(HashMap[address, bool])


@deploy
def __init__():
    self.owner = msg.sender
    log OwnershipTransferred(previous_owner=empty(address), new_owner=msg.sender)


@external
def transfer(receiver: address, amount: uint256) -> bool:
    """
    @notice Move `amount` base units from the caller to `receiver`.
    @dev Reverts when either side is blocked, like USDC's blacklist.
    @param receiver Who gets the tokens; not the zero address.
    @param amount Base units to move.
    @return True; failures revert.
    """
    self._transfer(msg.sender, receiver, amount)
    return True


@external
def transferFrom(sender: address, receiver: address, amount: uint256) -> bool:
    """
    @notice Move `amount` from `sender` to `receiver` using the caller's allowance.
    @dev Like USDC, the lowered allowance is not logged as an Approval.
    @param sender Whose tokens move.
    @param receiver Who gets them; not the zero address.
    @param amount Base units to move; at most the allowance.
    @return True; failures revert.
    """
    allowed: uint256 = self.allowance[sender][msg.sender]
    assert allowed >= amount, "TestUSDC: allowance too low"
    if allowed != max_value(uint256):
        self.allowance[sender][msg.sender] = allowed - amount
    self._transfer(sender, receiver, amount)
    return True


@external
def approve(spender: address, amount: uint256) -> bool:
    """
    @notice Let `spender` move up to `amount` of the caller's tokens.
    @param spender Who may spend.
    @param amount The new allowance; the maximum uint256 never decreases.
    @return True.
    """
    self.allowance[msg.sender][spender] = amount
    log Approval(owner=msg.sender, spender=spender, value=amount)
    return True


@external
def mint(receiver: address, amount: uint256):
    """
    @notice Create `amount` new tokens for `receiver`. Public: dev chains only.
    @param receiver Who gets the tokens; not the zero address.
    @param amount Base units to create.
    """
    assert receiver != empty(address), "TestUSDC: mint to zero address"
    self.totalSupply += amount
    self.balanceOf[receiver] += amount
    log Transfer(sender=empty(address), receiver=receiver, value=amount)


@external
def set_blocked(account: address, is_blocked: bool):
    """
    @notice Block or unblock `account` from sending and receiving.
    @dev Owner only; models the USDC blacklist for refund-failure tests.
    @param account The address to block or unblock.
    @param is_blocked True to block.
    """
    assert msg.sender == self.owner, "TestUSDC: caller is not the owner"
    self.blocked[account] = is_blocked
    log BlockedSet(account=account, blocked=is_blocked)


@internal
def _transfer(sender: address, receiver: address, amount: uint256):
    assert receiver != empty(address), "TestUSDC: transfer to zero address"
    assert not self.blocked[sender], "TestUSDC: sender is blocked"
    assert not self.blocked[receiver], "TestUSDC: receiver is blocked"
    balance: uint256 = self.balanceOf[sender]
    assert balance >= amount, "TestUSDC: balance too low"
    self.balanceOf[sender] = balance - amount
    self.balanceOf[receiver] += amount
    log Transfer(sender=sender, receiver=receiver, value=amount)
