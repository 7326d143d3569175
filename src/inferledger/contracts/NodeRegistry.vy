# pragma version 0.4.3
# pragma evm-version cancun
"""
@title NodeRegistry
@notice Hosts register an API URL, the models they serve with an input (prompt)
        and an output (completion) price per million tokens each, and a stake. Leaving is a two-step unbonding that
        cannot complete while the host has open sessions or unreleased exposure. A host's
        exposure (open deposits plus what settled sessions paid until their dispute window
        is released) is capped at `exposure_bps` of its stake, so a slash always covers it.
        Only the dispute contract can slash, and only for a resolved dispute; the owner has
        no power over stakes.
@license Apache-2.0
"""

from ethereum.ercs import IERC20

interface ModelRegistry:
    def is_approved(model_id: bytes32) -> bool: view

MAX_MODELS: constant(uint256) = 16

# Stored per host. Sessions are counted with two ever-growing counters, not one
# that drops back to zero: rewriting a zero slot costs ~17k gas more per session.
struct Host:
    api_url: String[256]
    stake: uint256
    active: bool
    registered: bool
    unbonding_ends_at: uint256
    sessions_opened: uint256
    sessions_closed: uint256
    exposure: uint256

# What `get_host` returns.
struct HostView:
    api_url: String[256]
    stake: uint256
    active: bool
    registered: bool
    unbonding_ends_at: uint256
    open_sessions: uint256
    exposure: uint256

event HostRegistered:
    host: indexed(address)
    api_url: String[256]
    stake: uint256

# The host starts or stops accepting new sessions.
event HostActiveChanged:
    host: indexed(address)
    active: bool

# `withdraw_stake` removed the registration: URL, stake and unbonding time are cleared.
event HostDeregistered:
    host: indexed(address)

event HostUrlUpdated:
    host: indexed(address)
    api_url: String[256]

# Both prices 0: the host no longer serves the model.
event ModelPriceSet:
    host: indexed(address)
    model_id: indexed(bytes32)
    input_price_per_mtok: uint256
    output_price_per_mtok: uint256

event StakeAdded:
    host: indexed(address)
    amount: uint256
    stake: uint256

event UnbondingStarted:
    host: indexed(address)
    unbonding_ends_at: uint256

event UnbondingCancelled:
    host: indexed(address)

event StakeWithdrawn:
    host: indexed(address)
    amount: uint256

event HostSlashed:
    host: indexed(address)
    amount: uint256
    recipient: address
    stake: uint256

event SessionCountChanged:
    host: indexed(address)
    open_sessions: uint256

# Deposits of open sessions plus paid amounts still inside their dispute window.
event ExposureChanged:
    host: indexed(address)
    exposure: uint256

event MarketplaceSet:
    marketplace: indexed(address)

event DisputesSet:
    disputes: indexed(address)

event OwnershipTransferStarted:
    previous_owner: indexed(address)
    new_owner: indexed(address)

event OwnershipTransferred:
    previous_owner: indexed(address)
    new_owner: indexed(address)

stake_token: public(immutable(IERC20))
model_registry: public(immutable(ModelRegistry))
min_stake: public(immutable(uint256))
unbonding_delay: public(immutable(uint256))
exposure_bps: public(immutable(uint256))

owner: public(address)
pending_owner: public(address)
marketplace: public(address)
disputes: public(address)

hosts: HashMap[address, Host]
# A model is served iff its output price is nonzero; the input price may be 0 (free prompts).
input_price_per_mtok: public(HashMap[address, HashMap[bytes32, uint256]])
output_price_per_mtok: public(HashMap[address, HashMap[bytes32, uint256]])
models_of: HashMap[address, DynArray[bytes32, MAX_MODELS]]
host_count: public(uint256)
host_at: public(HashMap[uint256, address])
listed: HashMap[address, bool]


@deploy
def __init__(
    token: IERC20,
    registry: ModelRegistry,
    minimum_stake: uint256,
    delay: uint256,
    exposure_cap_bps: uint256,
):
    assert exposure_cap_bps > 0, "NodeRegistry: zero exposure cap"
    stake_token = token
    model_registry = registry
    min_stake = minimum_stake
    unbonding_delay = delay
    exposure_bps = exposure_cap_bps
    self.owner = msg.sender
    log OwnershipTransferred(previous_owner=empty(address), new_owner=msg.sender)


@external
@nonreentrant
def register(
    api_url: String[256],
    model_ids: DynArray[bytes32, MAX_MODELS],
    input_prices: DynArray[uint256, MAX_MODELS],
    output_prices: DynArray[uint256, MAX_MODELS],
    stake: uint256,
):
    """
    @notice Register the caller as a host and pull `stake` from it.
    @param api_url Where clients reach the node (ws/http base URL).
    @param model_ids Approved models the host serves.
    @param input_prices Price per million prompt tokens for each model, in token
           base units; may be 0.
    @param output_prices Price per million completion tokens for each model, in
           token base units; must be nonzero.
    @param stake Amount of the stake token to lock; at least `min_stake`.
    """
    assert not self.hosts[msg.sender].registered, "NodeRegistry: already registered"
    assert len(api_url) > 0, "NodeRegistry: empty API URL"
    assert stake >= min_stake, "NodeRegistry: stake below minimum"
    assert len(model_ids) > 0, "NodeRegistry: no models"
    self.hosts[msg.sender] = Host(
        api_url=api_url,
        stake=stake,
        active=True,
        registered=True,
        unbonding_ends_at=0,
        sessions_opened=0,
        sessions_closed=0,
        exposure=0,
    )
    if not self.listed[msg.sender]:
        self.listed[msg.sender] = True
        self.host_at[self.host_count] = msg.sender
        self.host_count += 1
    log HostRegistered(host=msg.sender, api_url=api_url, stake=stake)
    log HostActiveChanged(host=msg.sender, active=True)
    self._set_models(msg.sender, model_ids, input_prices, output_prices)
    assert extcall stake_token.transferFrom(
        msg.sender, self, stake, default_return_value=True
    ), "NodeRegistry: stake transfer failed"


@external
def update_url(api_url: String[256]):
    """
    @notice Change the caller's API URL.
    @param api_url The new URL; not empty.
    """
    assert self.hosts[msg.sender].registered, "NodeRegistry: not registered"
    assert len(api_url) > 0, "NodeRegistry: empty API URL"
    self.hosts[msg.sender].api_url = api_url
    log HostUrlUpdated(host=msg.sender, api_url=api_url)


@external
def set_models(
    model_ids: DynArray[bytes32, MAX_MODELS],
    input_prices: DynArray[uint256, MAX_MODELS],
    output_prices: DynArray[uint256, MAX_MODELS],
):
    """
    @notice Replace the caller's model list and prices.
    @dev Open sessions keep the prices they were created with.
    @param model_ids Approved models the host serves from now on.
    @param input_prices Price per million prompt tokens for each model; may be 0.
    @param output_prices Price per million completion tokens for each model; nonzero.
    """
    assert self.hosts[msg.sender].registered, "NodeRegistry: not registered"
    assert len(model_ids) > 0, "NodeRegistry: no models"
    self._clear_models(msg.sender)
    self._set_models(msg.sender, model_ids, input_prices, output_prices)


@external
@nonreentrant
def add_stake(amount: uint256):
    """
    @notice Lock `amount` more of the stake token for the caller.
    @dev Reactivates a host that a slash left below the minimum, unless it is unbonding.
    @param amount Stake token base units to add; nonzero.
    """
    assert self.hosts[msg.sender].registered, "NodeRegistry: not registered"
    assert amount > 0, "NodeRegistry: zero amount"
    new_stake: uint256 = self.hosts[msg.sender].stake + amount
    self.hosts[msg.sender].stake = new_stake
    log StakeAdded(host=msg.sender, amount=amount, stake=new_stake)
    # A host slashed below the minimum becomes active again once topped up.
    if new_stake >= min_stake and self.hosts[msg.sender].unbonding_ends_at == 0:
        self._set_active(msg.sender, True)
    assert extcall stake_token.transferFrom(
        msg.sender, self, amount, default_return_value=True
    ), "NodeRegistry: stake transfer failed"


@external
def request_unstake():
    """
    @notice Stop accepting sessions and start the unbonding delay.
    """
    host: Host = self.hosts[msg.sender]
    assert host.registered, "NodeRegistry: not registered"
    assert host.unbonding_ends_at == 0, "NodeRegistry: already unbonding"
    ends_at: uint256 = block.timestamp + unbonding_delay
    self.hosts[msg.sender].unbonding_ends_at = ends_at
    log UnbondingStarted(host=msg.sender, unbonding_ends_at=ends_at)
    self._set_active(msg.sender, False)


@external
def cancel_unstake():
    """
    @notice Abort unbonding and accept sessions again.
    """
    host: Host = self.hosts[msg.sender]
    assert host.unbonding_ends_at != 0, "NodeRegistry: not unbonding"
    assert host.stake >= min_stake, "NodeRegistry: stake below minimum"
    self.hosts[msg.sender].unbonding_ends_at = 0
    log UnbondingCancelled(host=msg.sender)
    self._set_active(msg.sender, True)


@external
@nonreentrant
def withdraw_stake():
    """
    @notice After the unbonding delay, with no open sessions, return the stake
            and remove the caller's registration.
    """
    host: Host = self.hosts[msg.sender]
    assert host.unbonding_ends_at != 0, "NodeRegistry: not unbonding"
    assert block.timestamp >= host.unbonding_ends_at, "NodeRegistry: still unbonding"
    assert host.sessions_opened == host.sessions_closed, "NodeRegistry: host has open sessions"
    assert host.exposure == 0, "NodeRegistry: host has unreleased exposure"
    self._clear_models(msg.sender)
    self.models_of[msg.sender] = []
    # An unbonding host is already inactive, so only the registration itself goes.
    self.hosts[msg.sender] = empty(Host)
    log HostDeregistered(host=msg.sender)
    log StakeWithdrawn(host=msg.sender, amount=host.stake)
    if host.stake > 0:
        assert extcall stake_token.transfer(
            msg.sender, host.stake, default_return_value=True
        ), "NodeRegistry: stake transfer failed"


@external
@nonreentrant
def slash(host_address: address, amount: uint256, recipient: address):
    """
    @notice Take `amount` of a host's stake and send it to `recipient`.
    @dev The dispute contract only, for a dispute that found fraud. A host left below
         the minimum stake stops being active.
    @param host_address The registered host to slash.
    @param amount Stake token base units to take; at most the host's stake.
    @param recipient Who receives the slashed amount.
    """
    assert msg.sender == self.disputes, "NodeRegistry: caller is not the disputes contract"
    assert recipient != empty(address), "NodeRegistry: recipient is the zero address"
    host: Host = self.hosts[host_address]
    assert host.registered, "NodeRegistry: not registered"
    assert amount > 0 and amount <= host.stake, "NodeRegistry: bad slash amount"
    remaining: uint256 = host.stake - amount
    self.hosts[host_address].stake = remaining
    log HostSlashed(host=host_address, amount=amount, recipient=recipient, stake=remaining)
    if remaining < min_stake:
        self._set_active(host_address, False)
    assert extcall stake_token.transfer(
        recipient, amount, default_return_value=True
    ), "NodeRegistry: slash transfer failed"


@external
def session_opened(host_address: address, deposit: uint256):
    """
    @notice Count a new open session of `deposit` for `host_address`. Marketplace only.
    @dev Reverts when the host's exposure would pass `exposure_bps` of its stake.
    @param host_address The session's host.
    @param deposit The session's deposit.
    """
    assert msg.sender == self.marketplace, "NodeRegistry: caller is not the marketplace"
    opened: uint256 = self.hosts[host_address].sessions_opened + 1
    self.hosts[host_address].sessions_opened = opened
    exposure: uint256 = self.hosts[host_address].exposure + deposit
    assert exposure * 10_000 <= self.hosts[host_address].stake * exposure_bps, "NodeRegistry: host exposure above its stake cap"
    self.hosts[host_address].exposure = exposure
    log SessionCountChanged(
        host=host_address, open_sessions=opened - self.hosts[host_address].sessions_closed
    )
    log ExposureChanged(host=host_address, exposure=exposure)


@external
def session_closed(host_address: address, deposit: uint256, paid: uint256):
    """
    @notice Count a settled session for `host_address`. Marketplace only.
    @dev The unpaid part of the deposit stops counting at once; what was paid counts
         until the dispute contract releases it after the dispute window.
    @param host_address The session's host.
    @param deposit The session's deposit.
    @param paid What the session paid (host share and fee); at most `deposit`.
    """
    assert msg.sender == self.marketplace, "NodeRegistry: caller is not the marketplace"
    closed: uint256 = self.hosts[host_address].sessions_closed + 1
    self.hosts[host_address].sessions_closed = closed
    exposure: uint256 = self.hosts[host_address].exposure - (deposit - paid)
    self.hosts[host_address].exposure = exposure
    log SessionCountChanged(
        host=host_address, open_sessions=self.hosts[host_address].sessions_opened - closed
    )
    log ExposureChanged(host=host_address, exposure=exposure)


@external
def release_exposure(host_address: address, amount: uint256):
    """
    @notice Stop counting `amount` a settled session paid against the host's cap.
    @dev The dispute contract only: after the session's dispute window, or a dispute
         that found fraud.
    @param host_address The session's host.
    @param amount What the session paid.
    """
    assert msg.sender == self.disputes, "NodeRegistry: caller is not the disputes contract"
    exposure: uint256 = self.hosts[host_address].exposure - amount
    self.hosts[host_address].exposure = exposure
    log ExposureChanged(host=host_address, exposure=exposure)


@external
def set_marketplace(marketplace: address):
    """
    @notice Name the marketplace allowed to count sessions. Owner only, once.
    @param marketplace The JobMarketplace; not the zero address.
    """
    assert msg.sender == self.owner, "NodeRegistry: caller is not the owner"
    assert self.marketplace == empty(address), "NodeRegistry: marketplace already set"
    assert marketplace != empty(address), "NodeRegistry: marketplace is the zero address"
    self.marketplace = marketplace
    log MarketplaceSet(marketplace=marketplace)


@external
def set_disputes(disputes: address):
    """
    @notice Name the dispute contract, the only one allowed to slash. Owner only, once.
    @param disputes The DisputeManager; not the zero address.
    """
    assert msg.sender == self.owner, "NodeRegistry: caller is not the owner"
    assert self.disputes == empty(address), "NodeRegistry: disputes already set"
    assert disputes != empty(address), "NodeRegistry: disputes is the zero address"
    self.disputes = disputes
    log DisputesSet(disputes=disputes)


@external
def transfer_ownership(new_owner: address):
    """
    @notice Offer the owner role to `new_owner`, who must accept it.
    @param new_owner The next owner; not the zero address.
    """
    assert msg.sender == self.owner, "NodeRegistry: caller is not the owner"
    assert new_owner != empty(address), "NodeRegistry: new owner is the zero address"
    self.pending_owner = new_owner
    log OwnershipTransferStarted(previous_owner=self.owner, new_owner=new_owner)


@external
def accept_ownership():
    """
    @notice Take the owner role offered to the caller.
    """
    assert msg.sender == self.pending_owner, "NodeRegistry: caller is not the pending owner"
    log OwnershipTransferred(previous_owner=self.owner, new_owner=msg.sender)
    self.owner = msg.sender
    self.pending_owner = empty(address)


@view
@external
def get_host(host_address: address) -> HostView:
    """
    @notice A host's registration, stake, status and open session count.
    """
    host: Host = self.hosts[host_address]
    return HostView(
        api_url=host.api_url,
        stake=host.stake,
        active=host.active,
        registered=host.registered,
        unbonding_ends_at=host.unbonding_ends_at,
        open_sessions=host.sessions_opened - host.sessions_closed,
        exposure=host.exposure,
    )


@view
@external
def stake_of(host_address: address) -> uint256:
    """
    @notice A host's stake.
    """
    return self.hosts[host_address].stake


@view
@external
def host_models(host_address: address) -> DynArray[bytes32, MAX_MODELS]:
    """
    @notice The models a host serves.
    """
    return self.models_of[host_address]


@view
@external
def is_active(host_address: address) -> bool:
    """
    @notice Whether a host accepts new sessions.
    """
    return self.hosts[host_address].active


@internal
def _set_active(host_address: address, active: bool):
    # Writes and logs only a real switch, so each HostActiveChanged is one.
    if self.hosts[host_address].active != active:
        self.hosts[host_address].active = active
        log HostActiveChanged(host=host_address, active=active)


@internal
def _clear_models(host_address: address):
    for old: bytes32 in self.models_of[host_address]:
        self.input_price_per_mtok[host_address][old] = 0
        self.output_price_per_mtok[host_address][old] = 0
        log ModelPriceSet(
            host=host_address, model_id=old, input_price_per_mtok=0, output_price_per_mtok=0
        )


@internal
def _set_models(
    host_address: address,
    model_ids: DynArray[bytes32, MAX_MODELS],
    input_prices: DynArray[uint256, MAX_MODELS],
    output_prices: DynArray[uint256, MAX_MODELS],
):
    assert len(model_ids) == len(input_prices) and len(model_ids) == len(
        output_prices
    ), "NodeRegistry: models and prices differ in length"
    for i: uint256 in range(len(model_ids), bound=MAX_MODELS):
        model_id: bytes32 = model_ids[i]
        assert staticcall model_registry.is_approved(model_id), "NodeRegistry: model not approved"
        assert output_prices[i] > 0, "NodeRegistry: zero price"
        assert self.output_price_per_mtok[host_address][model_id] == 0, "NodeRegistry: duplicate model"
        self.input_price_per_mtok[host_address][model_id] = input_prices[i]
        self.output_price_per_mtok[host_address][model_id] = output_prices[i]
        log ModelPriceSet(
            host=host_address,
            model_id=model_id,
            input_price_per_mtok=input_prices[i],
            output_price_per_mtok=output_prices[i],
        )
    self.models_of[host_address] = model_ids
