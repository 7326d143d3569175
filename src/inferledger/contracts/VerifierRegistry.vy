# pragma version 0.4.3
# pragma evm-version cancun
"""
@title VerifierRegistry
@notice Staked verifiers that disputes draw their juries from. A verifier registers a
        URL where challengers deliver evidence and a stake; while active it can be
        drawn. Leaving is a two-step unbonding that cannot complete while it holds a
        jury seat. Only the dispute contract can take stake (a silent or minority juror).
@license Apache-2.0
"""

from ethereum.ercs import IERC20

struct Verifier:
    url: String[256]
    stake: uint256
    registered: bool
    unbonding_ends_at: uint256
    assignments: uint256
    # Position in the active list plus one; 0 when not active.
    slot: uint256

# What `get_verifier` returns.
struct VerifierView:
    url: String[256]
    stake: uint256
    active: bool
    registered: bool
    unbonding_ends_at: uint256
    assignments: uint256

event VerifierRegistered:
    verifier: indexed(address)
    url: String[256]
    stake: uint256

event VerifierUrlUpdated:
    verifier: indexed(address)
    url: String[256]

# The verifier can (true) or can no longer (false) be drawn.
event VerifierActiveChanged:
    verifier: indexed(address)
    active: bool

event VerifierStakeAdded:
    verifier: indexed(address)
    amount: uint256
    stake: uint256

event VerifierUnbondingStarted:
    verifier: indexed(address)
    unbonding_ends_at: uint256

event VerifierUnbondingCancelled:
    verifier: indexed(address)

event VerifierStakeWithdrawn:
    verifier: indexed(address)
    amount: uint256

event VerifierPenalized:
    verifier: indexed(address)
    amount: uint256
    recipient: address
    stake: uint256

event AssignmentsChanged:
    verifier: indexed(address)
    assignments: uint256

event DisputesSet:
    disputes: indexed(address)

event OwnershipTransferred:
    previous_owner: indexed(address)
    new_owner: indexed(address)

stake_token: public(immutable(IERC20))
min_stake: public(immutable(uint256))
unbonding_delay: public(immutable(uint256))

owner: public(address)
disputes: public(address)
verifiers: HashMap[address, Verifier]
active_count: public(uint256)
active_at: public(HashMap[uint256, address])


@deploy
def __init__(token: IERC20, minimum_stake: uint256, delay: uint256):
    assert minimum_stake > 0, "VerifierRegistry: zero minimum stake"
    stake_token = token
    min_stake = minimum_stake
    unbonding_delay = delay
    self.owner = msg.sender
    log OwnershipTransferred(previous_owner=empty(address), new_owner=msg.sender)


@external
@nonreentrant
def register(url: String[256], stake: uint256):
    """
    @notice Register the caller as a verifier, pull `stake` and make it drawable.
    @param url Where challengers deliver evidence (http(s) base URL); not empty.
    @param stake Stake token base units; at least `min_stake`.
    """
    assert not self.verifiers[msg.sender].registered, "VerifierRegistry: already registered"
    assert len(url) > 0, "VerifierRegistry: empty URL"
    assert stake >= min_stake, "VerifierRegistry: stake below minimum"
    self.verifiers[msg.sender] = Verifier(
        url=url, stake=stake, registered=True, unbonding_ends_at=0, assignments=0, slot=0
    )
    log VerifierRegistered(verifier=msg.sender, url=url, stake=stake)
    self._activate(msg.sender)
    assert extcall stake_token.transferFrom(
        msg.sender, self, stake, default_return_value=True
    ), "VerifierRegistry: stake transfer failed"


@external
def update_url(url: String[256]):
    """
    @notice Change where the caller takes evidence.
    @param url The new URL; not empty.
    """
    assert self.verifiers[msg.sender].registered, "VerifierRegistry: not registered"
    assert len(url) > 0, "VerifierRegistry: empty URL"
    self.verifiers[msg.sender].url = url
    log VerifierUrlUpdated(verifier=msg.sender, url=url)


@external
@nonreentrant
def add_stake(amount: uint256):
    """
    @notice Lock `amount` more; a verifier penalized below the minimum is drawable again.
    @param amount Stake token base units; nonzero.
    """
    assert self.verifiers[msg.sender].registered, "VerifierRegistry: not registered"
    assert amount > 0, "VerifierRegistry: zero amount"
    stake: uint256 = self.verifiers[msg.sender].stake + amount
    self.verifiers[msg.sender].stake = stake
    log VerifierStakeAdded(verifier=msg.sender, amount=amount, stake=stake)
    if stake >= min_stake and self.verifiers[msg.sender].unbonding_ends_at == 0:
        self._activate(msg.sender)
    assert extcall stake_token.transferFrom(
        msg.sender, self, amount, default_return_value=True
    ), "VerifierRegistry: stake transfer failed"


@external
def request_unstake():
    """
    @notice Stop being drawn and start the unbonding delay.
    """
    assert self.verifiers[msg.sender].registered, "VerifierRegistry: not registered"
    assert self.verifiers[msg.sender].unbonding_ends_at == 0, "VerifierRegistry: already unbonding"
    ends_at: uint256 = block.timestamp + unbonding_delay
    self.verifiers[msg.sender].unbonding_ends_at = ends_at
    log VerifierUnbondingStarted(verifier=msg.sender, unbonding_ends_at=ends_at)
    self._deactivate(msg.sender)


@external
def cancel_unstake():
    """
    @notice Abort unbonding and be drawable again.
    """
    assert self.verifiers[msg.sender].unbonding_ends_at != 0, "VerifierRegistry: not unbonding"
    assert self.verifiers[msg.sender].stake >= min_stake, "VerifierRegistry: stake below minimum"
    self.verifiers[msg.sender].unbonding_ends_at = 0
    log VerifierUnbondingCancelled(verifier=msg.sender)
    self._activate(msg.sender)


@external
@nonreentrant
def withdraw_stake():
    """
    @notice After the unbonding delay, with no jury seat held, return the stake and
            remove the registration.
    """
    verifier: Verifier = self.verifiers[msg.sender]
    assert verifier.unbonding_ends_at != 0, "VerifierRegistry: not unbonding"
    assert block.timestamp >= verifier.unbonding_ends_at, "VerifierRegistry: still unbonding"
    assert verifier.assignments == 0, "VerifierRegistry: verifier holds a jury seat"
    self.verifiers[msg.sender] = empty(Verifier)
    log VerifierStakeWithdrawn(verifier=msg.sender, amount=verifier.stake)
    if verifier.stake > 0:
        assert extcall stake_token.transfer(
            msg.sender, verifier.stake, default_return_value=True
        ), "VerifierRegistry: stake transfer failed"


@external
@nonreentrant
def penalize(verifier: address, amount: uint256, recipient: address) -> uint256:
    """
    @notice Take up to `amount` of a verifier's stake to `recipient`. Disputes only.
    @dev A verifier left below the minimum stops being drawable.
    @return What was taken: `amount`, or the whole stake if smaller.
    """
    assert msg.sender == self.disputes, "VerifierRegistry: caller is not the disputes contract"
    taken: uint256 = min(amount, self.verifiers[verifier].stake)
    stake: uint256 = self.verifiers[verifier].stake - taken
    self.verifiers[verifier].stake = stake
    log VerifierPenalized(verifier=verifier, amount=taken, recipient=recipient, stake=stake)
    if stake < min_stake:
        self._deactivate(verifier)
    if taken > 0:
        assert extcall stake_token.transfer(
            recipient, taken, default_return_value=True
        ), "VerifierRegistry: penalty transfer failed"
    return taken


@external
def assign(verifier: address):
    """
    @notice Count a jury seat the verifier now holds. Disputes only.
    """
    assert msg.sender == self.disputes, "VerifierRegistry: caller is not the disputes contract"
    count: uint256 = self.verifiers[verifier].assignments + 1
    self.verifiers[verifier].assignments = count
    log AssignmentsChanged(verifier=verifier, assignments=count)


@external
def release(verifier: address):
    """
    @notice Count a jury seat the verifier no longer holds. Disputes only.
    """
    assert msg.sender == self.disputes, "VerifierRegistry: caller is not the disputes contract"
    count: uint256 = self.verifiers[verifier].assignments - 1
    self.verifiers[verifier].assignments = count
    log AssignmentsChanged(verifier=verifier, assignments=count)


@external
def set_disputes(disputes: address):
    """
    @notice Name the dispute contract. Owner only, once; the owner has no other power.
    @param disputes The DisputeManager; not the zero address.
    """
    assert msg.sender == self.owner, "VerifierRegistry: caller is not the owner"
    assert self.disputes == empty(address), "VerifierRegistry: disputes already set"
    assert disputes != empty(address), "VerifierRegistry: disputes is the zero address"
    self.disputes = disputes
    log DisputesSet(disputes=disputes)


@view
@external
def get_verifier(verifier: address) -> VerifierView:
    """
    @notice A verifier's URL, stake, state and open jury seats.
    """
    v: Verifier = self.verifiers[verifier]
    return VerifierView(
        url=v.url,
        stake=v.stake,
        active=v.slot != 0,
        registered=v.registered,
        unbonding_ends_at=v.unbonding_ends_at,
        assignments=v.assignments,
    )


@view
@external
def is_active(verifier: address) -> bool:
    """
    @notice Whether the verifier can be drawn.
    """
    return self.verifiers[verifier].slot != 0


@internal
def _activate(verifier: address):
    if self.verifiers[verifier].slot == 0:
        count: uint256 = self.active_count
        self.active_at[count] = verifier
        self.active_count = count + 1
        self.verifiers[verifier].slot = count + 1
        log VerifierActiveChanged(verifier=verifier, active=True)


@internal
def _deactivate(verifier: address):
    slot: uint256 = self.verifiers[verifier].slot
    if slot != 0:
        last: uint256 = self.active_count - 1
        moved: address = self.active_at[last]
        self.active_at[slot - 1] = moved
        self.verifiers[moved].slot = slot
        self.active_at[last] = empty(address)
        self.active_count = last
        self.verifiers[verifier].slot = 0
        log VerifierActiveChanged(verifier=verifier, active=False)
