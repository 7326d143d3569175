# pragma version 0.4.3
# pragma evm-version cancun
"""
@title JobMarketplace
@notice Escrowed pay-per-token inference sessions. A user deposits the payment
        token for a session with a host; the host is paid for the tokens the
        user's session signer has receipted (EIP-712), the treasury takes a fee
        snapshotted at creation, and the user gets the rest back. Every session
        ends: the host completes it, the depositor can request a close and, once
        the close window has passed, anyone can finalize it; an expired session
        can be finalized by anyone after the same window.
@license Apache-2.0
"""

from ethereum.ercs import IERC20

interface NodeRegistry:
    def is_active(host: address) -> bool: view
    def price_per_mtok(host: address, model_id: bytes32) -> uint256: view
    def session_opened(host: address): nonpayable
    def session_closed(host: address): nonpayable

interface ModelRegistry:
    def is_approved(model_id: bytes32) -> bool: view

interface HostEarnings:
    def credit(host: address, token: address, amount: uint256): nonpayable

STATUS_OPEN: constant(uint8) = 1
STATUS_SETTLED: constant(uint8) = 2
ROLE_USER: constant(uint8) = 0
ROLE_HOST: constant(uint8) = 1

MAX_FEE_BPS: constant(uint256) = 2000
BPS: constant(uint256) = 10_000
MTOK: constant(uint256) = 1_000_000
MIN_PROOF_INTERVAL: constant(uint256) = 10
MAX_PROOF_INTERVAL: constant(uint256) = 1_000_000
MIN_DURATION: constant(uint256) = 60
MAX_DURATION: constant(uint256) = 30 * 86400
MAX_PAGE: constant(uint256) = 100
# Upper half of the secp256k1 order: signatures with a larger s are malleable twins.
MAX_S: constant(uint256) = 57896044618658097711785492504343953926418782139537452191302581570759080747168

DOMAIN_TYPEHASH: constant(bytes32) = keccak256(
    "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
RECEIPT_TYPEHASH: constant(bytes32) = keccak256(
    "Receipt(uint256 sessionId,uint256 tokens,bytes32 proofHash)"
)
DOMAIN_NAME_HASH: constant(bytes32) = keccak256("inferledger")
DOMAIN_VERSION_HASH: constant(bytes32) = keccak256("1")

struct Session:
    depositor: address
    host: address
    signer: address
    model_id: bytes32
    deposit: uint256
    price_per_mtok: uint256
    fee_bps: uint256
    proof_interval: uint256
    created_at: uint256
    expires_at: uint256
    close_requested_at: uint256
    tokens_paid: uint256
    proof_hash: bytes32
    checkpoints: uint256
    status: uint8

event SessionCreated:
    session_id: indexed(uint256)
    depositor: indexed(address)
    host: indexed(address)
    model_id: bytes32
    signer: address
    deposit: uint256
    price_per_mtok: uint256
    fee_bps: uint256
    proof_interval: uint256
    expires_at: uint256

event CheckpointSubmitted:
    session_id: indexed(uint256)
    index: uint256
    tokens: uint256
    proof_hash: bytes32
    proof_uri: String[256]

event CloseRequested:
    session_id: indexed(uint256)
    depositor: indexed(address)
    deadline: uint256

event SessionSettled:
    session_id: indexed(uint256)
    host: indexed(address)
    settled_by: indexed(address)
    tokens: uint256
    host_amount: uint256
    fee: uint256
    refund: uint256

event RefundCredited:
    depositor: indexed(address)
    session_id: indexed(uint256)
    amount: uint256

event RefundWithdrawn:
    depositor: indexed(address)
    amount: uint256

event TreasuryWithdrawn:
    treasury: indexed(address)
    amount: uint256

event FeeUpdated:
    fee_bps: uint256

event TreasuryUpdated:
    treasury: indexed(address)

event OwnershipTransferred:
    previous_owner: indexed(address)
    new_owner: indexed(address)

token: public(immutable(IERC20))
node_registry: public(immutable(NodeRegistry))
model_registry: public(immutable(ModelRegistry))
host_earnings: public(immutable(HostEarnings))
min_deposit: public(immutable(uint256))
max_deposit: public(immutable(uint256))
close_window: public(immutable(uint256))

owner: public(address)
treasury: public(address)
fee_bps: public(uint256)
treasury_balance: public(uint256)
refund_credit: public(HashMap[address, uint256])
open_deposits: public(uint256)

session_count: public(uint256)
sessions: HashMap[uint256, Session]
# Per role (user or host) and address: how many sessions, and their ids in order.
index_count: HashMap[uint8, HashMap[address, uint256]]
index_at: HashMap[uint8, HashMap[address, HashMap[uint256, uint256]]]


@deploy
def __init__(
    payment_token: IERC20,
    nodes: NodeRegistry,
    models: ModelRegistry,
    earnings: HostEarnings,
    treasury_address: address,
    initial_fee_bps: uint256,
    deposit_min: uint256,
    deposit_max: uint256,
    window: uint256,
):
    assert treasury_address != empty(address), "JobMarketplace: treasury is the zero address"
    assert initial_fee_bps <= MAX_FEE_BPS, "JobMarketplace: fee above maximum"
    assert deposit_min > 0 and deposit_min <= deposit_max, "JobMarketplace: bad deposit bounds"
    assert window > 0, "JobMarketplace: zero close window"
    token = payment_token
    node_registry = nodes
    model_registry = models
    host_earnings = earnings
    min_deposit = deposit_min
    max_deposit = deposit_max
    close_window = window
    self.owner = msg.sender
    self.treasury = treasury_address
    self.fee_bps = initial_fee_bps
    log OwnershipTransferred(previous_owner=empty(address), new_owner=msg.sender)
    log TreasuryUpdated(treasury=treasury_address)
    log FeeUpdated(fee_bps=initial_fee_bps)


@external
@nonreentrant
def create_session(
    host: address,
    model_id: bytes32,
    deposit: uint256,
    price_per_mtok: uint256,
    max_duration: uint256,
    proof_interval: uint256,
    session_signer: address,
) -> uint256:
    """
    @notice Open a session with `host` and pull `deposit` from the caller.
    @param host The host's address in the NodeRegistry.
    @param model_id The model to use; the host must serve it.
    @param deposit Budget in payment-token base units; unused funds are refunded.
    @param price_per_mtok The most the caller accepts per million tokens. The
           session is priced at the host's registered price, which is not higher.
    @param max_duration Seconds until the session expires.
    @param proof_interval Tokens between receipts; the deposit must buy at least one.
    @param session_signer Key that signs receipts for this session.
    @return The new session id (ids start at 1).
    """
    assert staticcall node_registry.is_active(host), "JobMarketplace: host not active"
    assert staticcall model_registry.is_approved(model_id), "JobMarketplace: model not approved"
    host_price: uint256 = staticcall node_registry.price_per_mtok(host, model_id)
    assert host_price > 0, "JobMarketplace: host does not serve this model"
    assert host_price <= price_per_mtok, "JobMarketplace: host price above offered price"
    assert deposit >= min_deposit, "JobMarketplace: deposit below minimum"
    assert deposit <= max_deposit, "JobMarketplace: deposit above maximum"
    assert proof_interval >= MIN_PROOF_INTERVAL, "JobMarketplace: proof interval too small"
    assert proof_interval <= MAX_PROOF_INTERVAL, "JobMarketplace: proof interval too large"
    assert max_duration >= MIN_DURATION, "JobMarketplace: duration too short"
    assert max_duration <= MAX_DURATION, "JobMarketplace: duration too long"
    assert session_signer != empty(address), "JobMarketplace: signer is the zero address"
    assert self._cost(proof_interval, host_price) <= deposit, "JobMarketplace: deposit buys less than one proof interval"

    session_id: uint256 = self.session_count + 1
    self.session_count = session_id
    expires_at: uint256 = block.timestamp + max_duration
    fee: uint256 = self.fee_bps
    self.sessions[session_id] = Session(
        depositor=msg.sender,
        host=host,
        signer=session_signer,
        model_id=model_id,
        deposit=deposit,
        price_per_mtok=host_price,
        fee_bps=fee,
        proof_interval=proof_interval,
        created_at=block.timestamp,
        expires_at=expires_at,
        close_requested_at=0,
        tokens_paid=0,
        proof_hash=empty(bytes32),
        checkpoints=0,
        status=STATUS_OPEN,
    )
    self.open_deposits += deposit
    self._index(ROLE_USER, msg.sender, session_id)
    self._index(ROLE_HOST, host, session_id)
    log SessionCreated(
        session_id=session_id,
        depositor=msg.sender,
        host=host,
        model_id=model_id,
        signer=session_signer,
        deposit=deposit,
        price_per_mtok=host_price,
        fee_bps=fee,
        proof_interval=proof_interval,
        expires_at=expires_at,
    )
    extcall node_registry.session_opened(host)
    assert extcall token.transferFrom(
        msg.sender, self, deposit, default_return_value=True
    ), "JobMarketplace: deposit transfer failed"
    return session_id


@external
@nonreentrant
def submit_checkpoint(
    session_id: uint256,
    tokens: uint256,
    proof_hash: bytes32,
    proof_uri: String[256],
    receipt_sig: Bytes[65],
):
    """
    @notice Record the user's receipt for `tokens` cumulative tokens on chain.
    @dev Host only. Optional: a host may hold receipts and only complete.
    @param session_id The session.
    @param tokens Cumulative tokens receipted; must exceed the last checkpoint.
    @param proof_hash keccak256 of the checkpoint's proof bundle.
    @param proof_uri Where the bundle can be fetched.
    @param receipt_sig The session signer's EIP-712 signature over the receipt.
    """
    self._checkpoint(session_id, tokens, proof_hash, proof_uri, receipt_sig, True)


@external
@nonreentrant
def complete_session(
    session_id: uint256,
    tokens: uint256,
    proof_hash: bytes32,
    proof_uri: String[256],
    receipt_sig: Bytes[65],
):
    """
    @notice Final checkpoint and settlement in one transaction.
    @dev Host only. With `tokens` equal to the last checkpoint no new receipt
         is needed and the session settles at what was already receipted.
    @param session_id The session.
    @param tokens Cumulative tokens receipted; at least the last checkpoint.
    @param proof_hash keccak256 of the final proof bundle.
    @param proof_uri Where the bundle can be fetched.
    @param receipt_sig The session signer's signature (ignored when nothing new is paid).
    """
    is_new: bool = tokens != self.sessions[session_id].tokens_paid
    self._checkpoint(session_id, tokens, proof_hash, proof_uri, receipt_sig, is_new)
    self._settle(session_id)


@external
def request_close(session_id: uint256):
    """
    @notice Depositor asks to end the session. The host has `close_window`
            seconds to submit its latest receipt; then anyone can finalize.
    """
    session: Session = self.sessions[session_id]
    assert session.status == STATUS_OPEN, "JobMarketplace: session not open"
    assert msg.sender == session.depositor, "JobMarketplace: caller is not the depositor"
    assert session.close_requested_at == 0, "JobMarketplace: close already requested"
    self.sessions[session_id].close_requested_at = block.timestamp
    log CloseRequested(
        session_id=session_id,
        depositor=msg.sender,
        deadline=self._deadline(session.expires_at, block.timestamp),
    )


@external
@nonreentrant
def finalize(session_id: uint256):
    """
    @notice Settle a session whose deadline has passed at its last checkpoint.
    @dev Anyone may call: after the close window of a close request, or after
         expiry plus the close window.
    """
    session: Session = self.sessions[session_id]
    assert session.status == STATUS_OPEN, "JobMarketplace: session not open"
    assert block.timestamp > self._deadline(
        session.expires_at, session.close_requested_at
    ), "JobMarketplace: close window still open"
    self._settle(session_id)


@external
@nonreentrant
def withdraw_refund() -> uint256:
    """
    @notice Send the caller the refunds that could not be pushed to it.
    @return The amount sent.
    """
    amount: uint256 = self.refund_credit[msg.sender]
    assert amount > 0, "JobMarketplace: no refund to withdraw"
    self.refund_credit[msg.sender] = 0
    log RefundWithdrawn(depositor=msg.sender, amount=amount)
    assert extcall token.transfer(
        msg.sender, amount, default_return_value=True
    ), "JobMarketplace: refund transfer failed"
    return amount


@external
@nonreentrant
def withdraw_treasury() -> uint256:
    """
    @notice Send the accrued protocol fees to the treasury. Treasury only.
    @return The amount sent.
    """
    assert msg.sender == self.treasury, "JobMarketplace: caller is not the treasury"
    amount: uint256 = self.treasury_balance
    assert amount > 0, "JobMarketplace: treasury balance is zero"
    self.treasury_balance = 0
    log TreasuryWithdrawn(treasury=msg.sender, amount=amount)
    assert extcall token.transfer(
        msg.sender, amount, default_return_value=True
    ), "JobMarketplace: treasury transfer failed"
    return amount


@external
def set_fee_bps(new_fee_bps: uint256):
    """
    @notice Change the fee for sessions created from now on. Owner only.
    """
    assert msg.sender == self.owner, "JobMarketplace: caller is not the owner"
    assert new_fee_bps <= MAX_FEE_BPS, "JobMarketplace: fee above maximum"
    self.fee_bps = new_fee_bps
    log FeeUpdated(fee_bps=new_fee_bps)


@external
def set_treasury(new_treasury: address):
    """
    @notice Change the address that withdraws protocol fees. Owner only.
    """
    assert msg.sender == self.owner, "JobMarketplace: caller is not the owner"
    assert new_treasury != empty(address), "JobMarketplace: treasury is the zero address"
    self.treasury = new_treasury
    log TreasuryUpdated(treasury=new_treasury)


@external
def transfer_ownership(new_owner: address):
    """
    @notice Hand the owner role to `new_owner`.
    """
    assert msg.sender == self.owner, "JobMarketplace: caller is not the owner"
    assert new_owner != empty(address), "JobMarketplace: new owner is the zero address"
    log OwnershipTransferred(previous_owner=self.owner, new_owner=new_owner)
    self.owner = new_owner


@view
@external
def get_session(session_id: uint256) -> Session:
    """
    @notice Everything stored about a session; status 0 means it does not exist.
    """
    return self.sessions[session_id]


@view
@external
def session_deadline(session_id: uint256) -> uint256:
    """
    @notice Last second at which the host may still checkpoint or complete;
            after it the session can be finalized by anyone.
    """
    session: Session = self.sessions[session_id]
    return self._deadline(session.expires_at, session.close_requested_at)


@view
@external
def sessions_of_user(user: address, start: uint256, limit: uint256) -> DynArray[uint256, MAX_PAGE]:
    """
    @notice Up to `limit` (max 100) session ids a user created, from index `start`.
    """
    return self._page(ROLE_USER, user, start, limit)


@view
@external
def sessions_of_host(host: address, start: uint256, limit: uint256) -> DynArray[uint256, MAX_PAGE]:
    """
    @notice Up to `limit` (max 100) session ids with `host`, from index `start`.
    """
    return self._page(ROLE_HOST, host, start, limit)


@view
@external
def user_session_count(user: address) -> uint256:
    """
    @notice How many sessions `user` has created.
    """
    return self.index_count[ROLE_USER][user]


@view
@external
def host_session_count(host: address) -> uint256:
    """
    @notice How many sessions were opened with `host`.
    """
    return self.index_count[ROLE_HOST][host]


@view
@external
def domain_separator() -> bytes32:
    """
    @notice The EIP-712 domain separator receipts are signed under.
    """
    return self._domain_separator()


@view
@external
def receipt_digest(session_id: uint256, tokens: uint256, proof_hash: bytes32) -> bytes32:
    """
    @notice The EIP-712 digest a session signer signs for a receipt.
    """
    return self._receipt_digest(session_id, tokens, proof_hash)


@pure
@external
def cost(tokens: uint256, price_per_mtok: uint256) -> uint256:
    """
    @notice Price of `tokens` tokens at `price_per_mtok`, rounded down.
    """
    return self._cost(tokens, price_per_mtok)


@internal
def _checkpoint(
    session_id: uint256,
    tokens: uint256,
    proof_hash: bytes32,
    proof_uri: String[256],
    receipt_sig: Bytes[65],
    is_new: bool,
):
    session: Session = self.sessions[session_id]
    assert session.status == STATUS_OPEN, "JobMarketplace: session not open"
    assert msg.sender == session.host, "JobMarketplace: caller is not the host"
    assert block.timestamp <= self._deadline(
        session.expires_at, session.close_requested_at
    ), "JobMarketplace: session deadline passed"
    if not is_new:
        return
    assert tokens > session.tokens_paid, "JobMarketplace: tokens must increase"
    assert self._cost(tokens, session.price_per_mtok) <= session.deposit, "JobMarketplace: tokens exceed budget"
    signer: address = self._recover(self._receipt_digest(session_id, tokens, proof_hash), receipt_sig)
    assert signer == session.signer, "JobMarketplace: receipt not signed by session signer"
    index: uint256 = session.checkpoints + 1
    self.sessions[session_id].tokens_paid = tokens
    self.sessions[session_id].proof_hash = proof_hash
    self.sessions[session_id].checkpoints = index
    log CheckpointSubmitted(
        session_id=session_id, index=index, tokens=tokens, proof_hash=proof_hash, proof_uri=proof_uri
    )


@internal
def _settle(session_id: uint256):
    session: Session = self.sessions[session_id]
    gross: uint256 = self._cost(session.tokens_paid, session.price_per_mtok)
    fee: uint256 = gross * session.fee_bps // BPS
    host_amount: uint256 = gross - fee
    refund: uint256 = session.deposit - gross

    self.sessions[session_id].status = STATUS_SETTLED
    self.open_deposits -= session.deposit
    self.treasury_balance += fee
    log SessionSettled(
        session_id=session_id,
        host=session.host,
        settled_by=msg.sender,
        tokens=session.tokens_paid,
        host_amount=host_amount,
        fee=fee,
        refund=refund,
    )

    extcall node_registry.session_closed(session.host)
    if host_amount > 0:
        assert extcall token.transfer(
            host_earnings.address, host_amount, default_return_value=True
        ), "JobMarketplace: host payout transfer failed"
        extcall host_earnings.credit(session.host, token.address, host_amount)
    if refund > 0:
        self._push_refund(session.depositor, session_id, refund)


@internal
def _push_refund(depositor: address, session_id: uint256, amount: uint256):
    # A depositor the token refuses to pay (e.g. a blocklisted address) must not
    # block settlement: the refund is credited for withdrawal instead.
    success: bool = False
    response: Bytes[32] = b""
    success, response = raw_call(
        token.address,
        abi_encode(depositor, amount, method_id=method_id("transfer(address,uint256)")),
        max_outsize=32,
        revert_on_failure=False,
    )
    if success and len(response) > 0:
        success = convert(response, bool)
    if not success:
        self.refund_credit[depositor] += amount
        log RefundCredited(depositor=depositor, session_id=session_id, amount=amount)


@view
@internal
def _deadline(expires_at: uint256, close_requested_at: uint256) -> uint256:
    start: uint256 = expires_at
    if close_requested_at != 0 and close_requested_at < expires_at:
        start = close_requested_at
    return start + close_window


@pure
@internal
def _cost(tokens: uint256, price_per_mtok: uint256) -> uint256:
    return tokens * price_per_mtok // MTOK


@view
@internal
def _domain_separator() -> bytes32:
    return keccak256(
        abi_encode(DOMAIN_TYPEHASH, DOMAIN_NAME_HASH, DOMAIN_VERSION_HASH, chain.id, self)
    )


@view
@internal
def _receipt_digest(session_id: uint256, tokens: uint256, proof_hash: bytes32) -> bytes32:
    struct_hash: bytes32 = keccak256(abi_encode(RECEIPT_TYPEHASH, session_id, tokens, proof_hash))
    return keccak256(concat(b"\x19\x01", self._domain_separator(), struct_hash))


@pure
@internal
def _recover(digest: bytes32, signature: Bytes[65]) -> address:
    assert len(signature) == 65, "JobMarketplace: receipt signature must be 65 bytes"
    r: uint256 = convert(extract32(signature, 0), uint256)
    s: uint256 = convert(extract32(signature, 32), uint256)
    v: uint256 = convert(slice(signature, 64, 1), uint256)
    assert v == 27 or v == 28, "JobMarketplace: bad receipt signature v"
    assert s <= MAX_S, "JobMarketplace: malleable receipt signature"
    signer: address = ecrecover(digest, v, r, s)
    assert signer != empty(address), "JobMarketplace: invalid receipt signature"
    return signer


@internal
def _index(role: uint8, who: address, session_id: uint256):
    position: uint256 = self.index_count[role][who]
    self.index_at[role][who][position] = session_id
    self.index_count[role][who] = position + 1


@view
@internal
def _page(role: uint8, who: address, start: uint256, limit: uint256) -> DynArray[uint256, MAX_PAGE]:
    count: uint256 = self.index_count[role][who]
    ids: DynArray[uint256, MAX_PAGE] = []
    for i: uint256 in range(MAX_PAGE):
        if i >= limit or start + i >= count:
            break
        ids.append(self.index_at[role][who][start + i])
    return ids
