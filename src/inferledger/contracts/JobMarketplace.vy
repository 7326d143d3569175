# pragma version 0.4.3
# pragma evm-version cancun
"""
@title JobMarketplace
@notice Escrowed pay-per-token inference sessions. A user deposits the payment
        token for a session with a host; the host is paid for the tokens the
        user's session signer has receipted (EIP-712), the treasury takes a fee
        snapshotted at creation, and the user gets the rest back. Prompt (input)
        and completion (output) tokens are priced separately, at the host's
        prices snapshotted at creation. Every session
        ends: the host completes it, the depositor can request a close and, once
        the close window has passed, anyone can finalize it; an expired session
        can be finalized by anyone after the same window.
@license Apache-2.0
"""

from ethereum.ercs import IERC20

interface NodeRegistry:
    def is_active(host: address) -> bool: view
    def input_price_per_mtok(host: address, model_id: bytes32) -> uint256: view
    def output_price_per_mtok(host: address, model_id: bytes32) -> uint256: view
    def session_opened(host: address, deposit: uint256): nonpayable
    def session_closed(host: address, deposit: uint256, paid: uint256): nonpayable

interface ModelRegistry:
    def is_approved(model_id: bytes32) -> bool: view

interface HostEarnings:
    def credit(host: address, token: address, amount: uint256): nonpayable

STATUS_OPEN: constant(uint8) = 1
STATUS_SETTLED: constant(uint8) = 2

MAX_FEE_BPS: constant(uint256) = 2000
BPS: constant(uint256) = 10_000
MTOK: constant(uint256) = 1_000_000
MIN_PROOF_INTERVAL: constant(uint256) = 10
MAX_PROOF_INTERVAL: constant(uint256) = 1_000_000
MIN_DURATION: constant(uint256) = 60
MAX_DURATION: constant(uint256) = 30 * 86400
MAX_PAGE: constant(uint256) = 100
MASK_160: constant(uint256) = 2**160 - 1
MASK_96: constant(uint256) = 2**96 - 1
MASK_80: constant(uint256) = 2**80 - 1
MASK_72: constant(uint256) = 2**72 - 1
MASK_40: constant(uint256) = 2**40 - 1
MASK_32: constant(uint256) = 2**32 - 1
MASK_16: constant(uint256) = 2**16 - 1
MAX_TOKENS: constant(uint256) = MASK_72  # each paid count's width in the packed state
# Upper half of the secp256k1 order: signatures with a larger s are malleable twins.
MAX_S: constant(uint256) = 57896044618658097711785492504343953926418782139537452191302581570759080747168

DOMAIN_TYPEHASH: constant(bytes32) = keccak256(
    "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
RECEIPT_TYPEHASH: constant(bytes32) = keccak256(
    "Receipt(uint256 sessionId,uint256 inputTokens,uint256 outputTokens,bytes32 proofHash)"
)
DOMAIN_NAME_HASH: constant(bytes32) = keccak256("inferledger")
DOMAIN_VERSION_HASH: constant(bytes32) = keccak256("1")

# Storage packs a session into seven slots (six written at creation) to keep
# create_session, submit_checkpoint and complete_session cheap; `get_session`
# returns it unpacked as `Session`.
#   depositor_link: depositor (bits 0-159) | this depositor's previous session id (160-255)
#   host_link:      host (0-159)           | this host's previous session id (160-255)
#   signer_terms:   signer (0-159) | fee_bps (160-175) | created_at (176-215) | expires_at (216-255)
#   amounts:        deposit (0-95) | input_price_per_mtok (96-175)
#                   | output_price_per_mtok (176-255)
#   state:          status (0-7) | proof_interval (8-39) | checkpoints (40-71)
#                   | close_requested_at (72-111) | input_tokens_paid (112-183)
#                   | output_tokens_paid (184-255)
# The constructor bounds max_deposit to 96 bits and create_session each price to 80.
struct Record:
    depositor_link: uint256
    host_link: uint256
    signer_terms: uint256
    model_id: bytes32
    amounts: uint256
    state: uint256
    proof_hash: bytes32

struct Session:
    depositor: address
    host: address
    signer: address
    model_id: bytes32
    deposit: uint256
    input_price_per_mtok: uint256
    output_price_per_mtok: uint256
    fee_bps: uint256
    proof_interval: uint256
    created_at: uint256
    expires_at: uint256
    close_requested_at: uint256
    input_tokens_paid: uint256
    output_tokens_paid: uint256
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
    input_price_per_mtok: uint256
    output_price_per_mtok: uint256
    fee_bps: uint256
    proof_interval: uint256
    expires_at: uint256

event CheckpointSubmitted:
    session_id: indexed(uint256)
    index: uint256
    input_tokens: uint256
    output_tokens: uint256
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
    input_tokens: uint256
    output_tokens: uint256
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
# When each session settled (0 while open): its dispute window starts there.
settled_at: public(HashMap[uint256, uint256])
open_deposits: public(uint256)

session_count: public(uint256)
records: HashMap[uint256, Record]
# Newest session id per depositor and per host; older ones are linked from each record.
latest_of_user: HashMap[address, uint256]
latest_of_host: HashMap[address, uint256]


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
    assert deposit_max <= MASK_96, "JobMarketplace: bad deposit bounds"
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
    max_input_price_per_mtok: uint256,
    max_output_price_per_mtok: uint256,
    max_duration: uint256,
    proof_interval: uint256,
    session_signer: address,
) -> uint256:
    """
    @notice Open a session with `host` and pull `deposit` from the caller.
    @param host The host's address in the NodeRegistry.
    @param model_id The model to use; the host must serve it.
    @param deposit Budget in payment-token base units; unused funds are refunded.
    @param max_input_price_per_mtok The most the caller accepts per million prompt
           tokens. The session is priced at the host's registered input price,
           which is not higher.
    @param max_output_price_per_mtok The same for completion tokens.
    @param max_duration Seconds until the session expires.
    @param proof_interval Output tokens between receipts; the deposit must buy
           at least one interval.
    @param session_signer Key that signs receipts for this session.
    @return The new session id (ids start at 1).
    """
    assert staticcall node_registry.is_active(host), "JobMarketplace: host not active"
    assert staticcall model_registry.is_approved(model_id), "JobMarketplace: model not approved"
    input_price: uint256 = staticcall node_registry.input_price_per_mtok(host, model_id)
    output_price: uint256 = staticcall node_registry.output_price_per_mtok(host, model_id)
    assert output_price > 0, "JobMarketplace: host does not serve this model"
    assert input_price <= max_input_price_per_mtok, "JobMarketplace: host input price above offered price"
    assert output_price <= max_output_price_per_mtok, "JobMarketplace: host output price above offered price"
    assert deposit >= min_deposit, "JobMarketplace: deposit below minimum"
    assert deposit <= max_deposit, "JobMarketplace: deposit above maximum"
    assert proof_interval >= MIN_PROOF_INTERVAL, "JobMarketplace: proof interval too small"
    assert proof_interval <= MAX_PROOF_INTERVAL, "JobMarketplace: proof interval too large"
    assert max_duration >= MIN_DURATION, "JobMarketplace: duration too short"
    assert max_duration <= MAX_DURATION, "JobMarketplace: duration too long"
    assert session_signer != empty(address), "JobMarketplace: signer is the zero address"
    assert input_price <= MASK_80, "JobMarketplace: host input price too large"
    assert output_price <= MASK_80, "JobMarketplace: host output price too large"
    assert self._cost(0, proof_interval, input_price, output_price) <= deposit, "JobMarketplace: deposit buys less than one proof interval"

    session_id: uint256 = self.session_count + 1
    self.session_count = session_id
    expires_at: uint256 = block.timestamp + max_duration
    fee: uint256 = self.fee_bps
    self.records[session_id] = Record(
        depositor_link=convert(msg.sender, uint256) | (self.latest_of_user[msg.sender] << 160),
        host_link=convert(host, uint256) | (self.latest_of_host[host] << 160),
        signer_terms=convert(session_signer, uint256)
        | (fee << 160)
        | (block.timestamp << 176)
        | (expires_at << 216),
        model_id=model_id,
        amounts=deposit | (input_price << 96) | (output_price << 176),
        state=self._pack_state(STATUS_OPEN, proof_interval, 0, 0, 0, 0),
        proof_hash=empty(bytes32),
    )
    self.latest_of_user[msg.sender] = session_id
    self.latest_of_host[host] = session_id
    self.open_deposits += deposit
    log SessionCreated(
        session_id=session_id,
        depositor=msg.sender,
        host=host,
        model_id=model_id,
        signer=session_signer,
        deposit=deposit,
        input_price_per_mtok=input_price,
        output_price_per_mtok=output_price,
        fee_bps=fee,
        proof_interval=proof_interval,
        expires_at=expires_at,
    )
    extcall node_registry.session_opened(host, deposit)
    assert extcall token.transferFrom(
        msg.sender, self, deposit, default_return_value=True
    ), "JobMarketplace: deposit transfer failed"
    return session_id


@external
@nonreentrant
def submit_checkpoint(
    session_id: uint256,
    input_tokens: uint256,
    output_tokens: uint256,
    proof_hash: bytes32,
    proof_uri: String[256],
    receipt_sig: Bytes[65],
):
    """
    @notice Record the user's receipt for cumulative input and output tokens on chain.
    @dev Host only. Optional: a host may hold receipts and only complete.
    @param session_id The session.
    @param input_tokens Cumulative prompt tokens receipted; not below the last checkpoint.
    @param output_tokens Cumulative completion tokens receipted; not below the last
           checkpoint. At least one of the two counts must increase.
    @param proof_hash keccak256 of the checkpoint's proof bundle.
    @param proof_uri Where the bundle can be fetched.
    @param receipt_sig The session signer's EIP-712 signature over the receipt.
    """
    self._checkpoint(
        session_id, input_tokens, output_tokens, proof_hash, proof_uri, receipt_sig, False
    )


@external
@nonreentrant
def complete_session(
    session_id: uint256,
    input_tokens: uint256,
    output_tokens: uint256,
    proof_hash: bytes32,
    proof_uri: String[256],
    receipt_sig: Bytes[65],
):
    """
    @notice Final checkpoint and settlement in one transaction.
    @dev Host only. With both counts equal to the last checkpoint no new receipt
         is needed and the session settles at what was already receipted.
    @param session_id The session.
    @param input_tokens Cumulative prompt tokens receipted; at least the last checkpoint.
    @param output_tokens Cumulative completion tokens receipted; at least the last checkpoint.
    @param proof_hash keccak256 of the final proof bundle.
    @param proof_uri Where the bundle can be fetched.
    @param receipt_sig The session signer's signature (ignored when nothing new is paid).
    """
    session: Session = self._checkpoint(
        session_id, input_tokens, output_tokens, proof_hash, proof_uri, receipt_sig, True
    )
    self._settle(session_id, session)


@external
def request_close(session_id: uint256):
    """
    @notice Depositor asks to end the session. The host has `close_window`
            seconds to submit its latest receipt; then anyone can finalize.
    @param session_id An open session of the caller's, not already closing.
    """
    session: Session = self._load(session_id)
    assert session.status == STATUS_OPEN, "JobMarketplace: session not open"
    assert msg.sender == session.depositor, "JobMarketplace: caller is not the depositor"
    assert session.close_requested_at == 0, "JobMarketplace: close already requested"
    self._save_state(session_id, session, block.timestamp)
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
    @param session_id An open session past its deadline.
    """
    session: Session = self._load(session_id)
    assert session.status == STATUS_OPEN, "JobMarketplace: session not open"
    assert block.timestamp > self._deadline(
        session.expires_at, session.close_requested_at
    ), "JobMarketplace: close window still open"
    self._settle(session_id, session)


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
    @param new_fee_bps The fee in basis points of the amount paid; at most 2000.
    """
    assert msg.sender == self.owner, "JobMarketplace: caller is not the owner"
    assert new_fee_bps <= MAX_FEE_BPS, "JobMarketplace: fee above maximum"
    self.fee_bps = new_fee_bps
    log FeeUpdated(fee_bps=new_fee_bps)


@external
def set_treasury(new_treasury: address):
    """
    @notice Change the address that withdraws protocol fees. Owner only.
    @param new_treasury The new treasury; not the zero address.
    """
    assert msg.sender == self.owner, "JobMarketplace: caller is not the owner"
    assert new_treasury != empty(address), "JobMarketplace: treasury is the zero address"
    self.treasury = new_treasury
    log TreasuryUpdated(treasury=new_treasury)


@external
def transfer_ownership(new_owner: address):
    """
    @notice Hand the owner role to `new_owner`.
    @param new_owner The next owner; not the zero address.
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
    return self._load(session_id)


@view
@external
def session_deadline(session_id: uint256) -> uint256:
    """
    @notice Last second at which the host may still checkpoint or complete;
            after it the session can be finalized by anyone.
    """
    session: Session = self._load(session_id)
    return self._deadline(session.expires_at, session.close_requested_at)


@view
@external
def sessions_of_user(user: address, cursor: uint256, limit: uint256) -> DynArray[uint256, MAX_PAGE]:
    """
    @notice Up to `limit` (max 100) ids of sessions `user` created, newest first.
    @param cursor 0 for the first page; for the next page, the last id of the
           previous one (the page then starts with the session before it).
    """
    start: uint256 = self.latest_of_user[user]
    if cursor != 0:
        link: uint256 = self.records[cursor].depositor_link
        assert link & MASK_160 == convert(user, uint256), "JobMarketplace: cursor is not a session of this user"
        start = link >> 160
    return self._walk(start, limit, True)


@view
@external
def sessions_of_host(host: address, cursor: uint256, limit: uint256) -> DynArray[uint256, MAX_PAGE]:
    """
    @notice Up to `limit` (max 100) ids of sessions with `host`, newest first.
    @param cursor 0 for the first page; for the next page, the last id of the previous one.
    """
    start: uint256 = self.latest_of_host[host]
    if cursor != 0:
        link: uint256 = self.records[cursor].host_link
        assert link & MASK_160 == convert(host, uint256), "JobMarketplace: cursor is not a session of this host"
        start = link >> 160
    return self._walk(start, limit, False)


@view
@external
def dispute_facts(session_id: uint256) -> (address, address, uint256, uint256):
    """
    @notice What a dispute needs of a session: its depositor, its host, what the
            depositor paid (host share and fee) and when it settled (0: not settled).
    """
    session: Session = self._load(session_id)
    paid: uint256 = 0
    if session.status == STATUS_SETTLED:
        paid = self._cost(
            session.input_tokens_paid,
            session.output_tokens_paid,
            session.input_price_per_mtok,
            session.output_price_per_mtok,
        )
    return session.depositor, session.host, paid, self.settled_at[session_id]


@view
@external
def domain_separator() -> bytes32:
    """
    @notice The EIP-712 domain separator receipts are signed under.
    """
    return self._domain_separator()


@view
@external
def receipt_digest(
    session_id: uint256, input_tokens: uint256, output_tokens: uint256, proof_hash: bytes32
) -> bytes32:
    """
    @notice The EIP-712 digest a session signer signs for a receipt.
    """
    return self._receipt_digest(session_id, input_tokens, output_tokens, proof_hash)


@pure
@external
def cost(
    input_tokens: uint256,
    output_tokens: uint256,
    input_price_per_mtok: uint256,
    output_price_per_mtok: uint256,
) -> uint256:
    """
    @notice Price of `input_tokens` prompt and `output_tokens` completion tokens at
            the given prices per million tokens, rounded down once over the sum.
    """
    return self._cost(input_tokens, output_tokens, input_price_per_mtok, output_price_per_mtok)


@internal
def _checkpoint(
    session_id: uint256,
    input_tokens: uint256,
    output_tokens: uint256,
    proof_hash: bytes32,
    proof_uri: String[256],
    receipt_sig: Bytes[65],
    final: bool,
) -> Session:
    # Returns the session as stored afterwards. `final`: completing at the
    # counts already paid needs no receipt.
    session: Session = self._load(session_id)
    assert session.status == STATUS_OPEN, "JobMarketplace: session not open"
    assert msg.sender == session.host, "JobMarketplace: caller is not the host"
    assert block.timestamp <= self._deadline(
        session.expires_at, session.close_requested_at
    ), "JobMarketplace: session deadline passed"
    input_changed: bool = input_tokens != session.input_tokens_paid
    output_changed: bool = output_tokens != session.output_tokens_paid
    if final and not (input_changed or output_changed):
        return session
    assert input_tokens >= session.input_tokens_paid and output_tokens >= session.output_tokens_paid, "JobMarketplace: tokens must not decrease"
    assert input_changed or output_changed, "JobMarketplace: tokens must increase"
    assert input_tokens <= MAX_TOKENS and output_tokens <= MAX_TOKENS, "JobMarketplace: tokens too large"
    assert self._cost(
        input_tokens, output_tokens, session.input_price_per_mtok, session.output_price_per_mtok
    ) <= session.deposit, "JobMarketplace: tokens exceed budget"
    signer: address = self._recover(
        self._receipt_digest(session_id, input_tokens, output_tokens, proof_hash), receipt_sig
    )
    assert signer == session.signer, "JobMarketplace: receipt not signed by session signer"
    index: uint256 = session.checkpoints + 1
    session.input_tokens_paid = input_tokens
    session.output_tokens_paid = output_tokens
    session.checkpoints = index
    session.proof_hash = proof_hash
    self._save_state(session_id, session, session.close_requested_at)
    self.records[session_id].proof_hash = proof_hash
    log CheckpointSubmitted(
        session_id=session_id,
        index=index,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        proof_hash=proof_hash,
        proof_uri=proof_uri,
    )
    return session


@internal
def _settle(session_id: uint256, session: Session):
    # `session` is the stored session, freshly loaded or checkpointed by the caller.
    gross: uint256 = self._cost(
        session.input_tokens_paid,
        session.output_tokens_paid,
        session.input_price_per_mtok,
        session.output_price_per_mtok,
    )
    fee: uint256 = gross * session.fee_bps // BPS
    host_amount: uint256 = gross - fee
    refund: uint256 = session.deposit - gross

    session.status = STATUS_SETTLED
    self._save_state(session_id, session, session.close_requested_at)
    self.settled_at[session_id] = block.timestamp
    self.open_deposits -= session.deposit
    self.treasury_balance += fee
    log SessionSettled(
        session_id=session_id,
        host=session.host,
        settled_by=msg.sender,
        input_tokens=session.input_tokens_paid,
        output_tokens=session.output_tokens_paid,
        host_amount=host_amount,
        fee=fee,
        refund=refund,
    )

    extcall node_registry.session_closed(session.host, session.deposit, gross)
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
def _cost(
    input_tokens: uint256, output_tokens: uint256, input_price: uint256, output_price: uint256
) -> uint256:
    return (input_tokens * input_price + output_tokens * output_price) // MTOK


@view
@internal
def _domain_separator() -> bytes32:
    return keccak256(
        abi_encode(DOMAIN_TYPEHASH, DOMAIN_NAME_HASH, DOMAIN_VERSION_HASH, chain.id, self)
    )


@view
@internal
def _receipt_digest(
    session_id: uint256, input_tokens: uint256, output_tokens: uint256, proof_hash: bytes32
) -> bytes32:
    struct_hash: bytes32 = keccak256(
        abi_encode(RECEIPT_TYPEHASH, session_id, input_tokens, output_tokens, proof_hash)
    )
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


@pure
@internal
def _pack_state(
    status: uint8,
    proof_interval: uint256,
    checkpoints: uint256,
    closed_at: uint256,
    input_tokens: uint256,
    output_tokens: uint256,
) -> uint256:
    return (
        convert(status, uint256)
        | (proof_interval << 8)
        | (checkpoints << 40)
        | (closed_at << 72)
        | (input_tokens << 112)
        | (output_tokens << 184)
    )


@internal
def _save_state(session_id: uint256, session: Session, close_requested_at: uint256):
    self.records[session_id].state = self._pack_state(
        session.status,
        session.proof_interval,
        session.checkpoints,
        close_requested_at,
        session.input_tokens_paid,
        session.output_tokens_paid,
    )


@view
@internal
def _load(session_id: uint256) -> Session:
    record: Record = self.records[session_id]
    return Session(
        depositor=convert(record.depositor_link & MASK_160, address),
        host=convert(record.host_link & MASK_160, address),
        signer=convert(record.signer_terms & MASK_160, address),
        model_id=record.model_id,
        deposit=record.amounts & MASK_96,
        input_price_per_mtok=(record.amounts >> 96) & MASK_80,
        output_price_per_mtok=record.amounts >> 176,
        fee_bps=(record.signer_terms >> 160) & MASK_16,
        proof_interval=(record.state >> 8) & MASK_32,
        created_at=(record.signer_terms >> 176) & MASK_40,
        expires_at=record.signer_terms >> 216,
        close_requested_at=(record.state >> 72) & MASK_40,
        input_tokens_paid=(record.state >> 112) & MASK_72,
        output_tokens_paid=record.state >> 184,
        proof_hash=record.proof_hash,
        checkpoints=(record.state >> 40) & MASK_32,
        status=convert(record.state & 255, uint8),
    )


@view
@internal
def _walk(start: uint256, limit: uint256, by_user: bool) -> DynArray[uint256, MAX_PAGE]:
    ids: DynArray[uint256, MAX_PAGE] = []
    current: uint256 = start
    for i: uint256 in range(MAX_PAGE):
        if i >= limit or current == 0:
            break
        ids.append(current)
        if by_user:
            current = self.records[current].depositor_link >> 160
        else:
            current = self.records[current].host_link >> 160
    return ids
