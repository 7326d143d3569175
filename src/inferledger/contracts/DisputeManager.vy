# pragma version 0.4.3
# pragma evm-version cancun
"""
@title DisputeManager
@notice Disputes over a checkpoint a host signed. Within `dispute_window` after a session
        settled, anyone holding its transcript opens a dispute on one host-signed proof
        bundle with a bond, committing to the transcript it reveals off chain to the jury.
        A jury of `jury_size` staked verifiers is drawn from the hash of the block the
        dispute opened in; each juror signs a verdict (EIP-712) that anyone can relay, and
        at a majority the dispute resolves itself. Fraud slashes the host and makes the
        depositor whole; no fraud pays the bond to the jurors and the host. Silent jurors
        are replaced and penalized, minority jurors penalized. Payouts are credits,
        withdrawn by their owners. There is no owner: every parameter is fixed here.
@license Apache-2.0
"""

from ethereum.ercs import IERC20

interface Marketplace:
    def dispute_facts(session_id: uint256) -> (address, address, uint256, uint256): view

interface NodeRegistry:
    def stake_of(host: address) -> uint256: view
    def slash(host: address, amount: uint256, recipient: address): nonpayable
    def release_exposure(host: address, amount: uint256): nonpayable
    def exposure_bps() -> uint256: view

interface VerifierRegistry:
    def active_count() -> uint256: view
    def active_at(index: uint256) -> address: view
    def penalize(verifier: address, amount: uint256, recipient: address) -> uint256: nonpayable
    def assign(verifier: address): nonpayable
    def release(verifier: address): nonpayable

STATUS_OPEN: constant(uint8) = 1
STATUS_RESOLVED: constant(uint8) = 2
STATUS_CANCELLED: constant(uint8) = 3
VOTE_HONEST: constant(uint8) = 1
VOTE_FRAUD: constant(uint8) = 2
MAX_JURY: constant(uint256) = 9
MAX_PROBE: constant(uint256) = 256
BPS: constant(uint256) = 10_000
MAX_S: constant(uint256) = 57896044618658097711785492504343953926418782139537452191302581570759080747168

DOMAIN_TYPEHASH: constant(bytes32) = keccak256(
    "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
VERDICT_TYPEHASH: constant(bytes32) = keccak256("Verdict(uint256 disputeId,bool fraud)")
DOMAIN_NAME_HASH: constant(bytes32) = keccak256("inferledger")
DOMAIN_VERSION_HASH: constant(bytes32) = keccak256("1")

struct Dispute:
    session_id: uint256
    checkpoint_index: uint256
    challenger: address
    bundle_hash: bytes32
    transcript_commitment: bytes32
    bond: uint256
    opened_at: uint256
    # The draw hashes this block; reset when seats are emptied.
    draw_block: uint256
    # Since when a seat has been empty (the opening, or the last replacement).
    empty_since: uint256
    verdict_deadline: uint256
    status: uint8
    fraud: bool
    votes_fraud: uint256
    votes_honest: uint256
    # Penalties taken from silent and minority jurors, paid to the winning side.
    penalties: uint256

event DisputeOpened:
    dispute_id: indexed(uint256)
    session_id: indexed(uint256)
    checkpoint_index: uint256
    challenger: indexed(address)
    bundle_hash: bytes32
    transcript_commitment: bytes32
    bond: uint256

event DrawDeferred:
    dispute_id: indexed(uint256)
    draw_block: uint256

event JurorDrawn:
    dispute_id: indexed(uint256)
    seat: uint256
    verifier: indexed(address)
    verdict_deadline: uint256

event VerdictSubmitted:
    dispute_id: indexed(uint256)
    verifier: indexed(address)
    fraud: bool

event JurorReplaced:
    dispute_id: indexed(uint256)
    verifier: indexed(address)
    penalty: uint256

event JurorPenalized:
    dispute_id: indexed(uint256)
    verifier: indexed(address)
    penalty: uint256

event DisputeResolved:
    dispute_id: indexed(uint256)
    session_id: indexed(uint256)
    fraud: bool
    slashed: uint256
    depositor_amount: uint256
    challenger_amount: uint256
    host_amount: uint256
    verifier_fees: uint256

event DisputeCancelled:
    dispute_id: indexed(uint256)

event ExposureReleased:
    session_id: indexed(uint256)
    host: indexed(address)
    amount: uint256

event Credited:
    account: indexed(address)
    dispute_id: indexed(uint256)
    amount: uint256

event Withdrawn:
    account: indexed(address)
    amount: uint256

token: public(immutable(IERC20))
marketplace: public(immutable(Marketplace))
node_registry: public(immutable(NodeRegistry))
verifier_registry: public(immutable(VerifierRegistry))
dispute_window: public(immutable(uint256))
bond: public(immutable(uint256))
jury_size: public(immutable(uint256))
verdict_period: public(immutable(uint256))
verifier_fee: public(immutable(uint256))
penalty_bps: public(immutable(uint256))
silent_penalty: public(immutable(uint256))
minority_penalty: public(immutable(uint256))

dispute_count: public(uint256)
disputes: HashMap[uint256, Dispute]
seats: HashMap[uint256, DynArray[address, MAX_JURY]]
sat: HashMap[uint256, HashMap[address, bool]]
votes: HashMap[uint256, HashMap[address, uint8]]
# The open dispute on a session (0: none); sessions found fraudulent; exposure released.
dispute_of_session: public(HashMap[uint256, uint256])
fraudulent: public(HashMap[uint256, bool])
released: public(HashMap[uint256, bool])
credit: public(HashMap[address, uint256])


@deploy
def __init__(
    payment_token: IERC20,
    market: Marketplace,
    nodes: NodeRegistry,
    verifiers: VerifierRegistry,
    window: uint256,
    dispute_bond: uint256,
    jurors: uint256,
    period: uint256,
    fee: uint256,
    slash_bps: uint256,
    silence: uint256,
    minority: uint256,
):
    assert jurors % 2 == 1 and jurors <= MAX_JURY, "DisputeManager: jury size must be odd, at most 9"
    assert slash_bps >= BPS, "DisputeManager: penalty below what the session paid"
    assert (staticcall nodes.exposure_bps()) * slash_bps <= BPS * BPS, "DisputeManager: exposure cap times penalty above the stake"
    assert window > 0 and period > 0, "DisputeManager: zero window or period"
    token = payment_token
    marketplace = market
    node_registry = nodes
    verifier_registry = verifiers
    dispute_window = window
    bond = dispute_bond
    jury_size = jurors
    verdict_period = period
    verifier_fee = fee
    penalty_bps = slash_bps
    silent_penalty = silence
    minority_penalty = minority


@external
@nonreentrant
def open_dispute(
    session_id: uint256,
    checkpoint_index: uint256,
    bundle_hash: bytes32,
    host_signature: Bytes[65],
    transcript_commitment: bytes32,
) -> uint256:
    """
    @notice Dispute one host-signed proof bundle of a settled session; pulls `bond`.
    @param session_id The settled session.
    @param checkpoint_index The bundle's checkpoint index (as the host wrote it).
    @param bundle_hash keccak256 of the bundle's encoding without its signature.
    @param host_signature The host's 65-byte signature over `bundle_hash`.
    @param transcript_commitment keccak256 of the transcript revealed to the jury.
    @return The dispute id (ids start at 1).
    """
    depositor: address = empty(address)
    host: address = empty(address)
    paid: uint256 = 0
    settled_at: uint256 = 0
    depositor, host, paid, settled_at = staticcall marketplace.dispute_facts(session_id)
    assert settled_at != 0, "DisputeManager: session not settled"
    assert block.timestamp <= settled_at + dispute_window, "DisputeManager: dispute window has passed"
    assert not self.fraudulent[session_id], "DisputeManager: session already found fraudulent"
    assert not self.released[session_id], "DisputeManager: dispute window has passed"
    assert self.dispute_of_session[session_id] == 0, "DisputeManager: a dispute is open on this session"
    assert checkpoint_index > 0, "DisputeManager: checkpoints start at 1"
    assert self._recover(bundle_hash, host_signature) == host, "DisputeManager: bundle not signed by the session's host"

    dispute_id: uint256 = self.dispute_count + 1
    self.dispute_count = dispute_id
    self.disputes[dispute_id] = Dispute(
        session_id=session_id,
        checkpoint_index=checkpoint_index,
        challenger=msg.sender,
        bundle_hash=bundle_hash,
        transcript_commitment=transcript_commitment,
        bond=bond,
        opened_at=block.timestamp,
        draw_block=block.number,
        empty_since=block.timestamp,
        verdict_deadline=0,
        status=STATUS_OPEN,
        fraud=False,
        votes_fraud=0,
        votes_honest=0,
        penalties=0,
    )
    empty_seats: DynArray[address, MAX_JURY] = []
    for i: uint256 in range(jury_size, bound=MAX_JURY):
        empty_seats.append(empty(address))
    self.seats[dispute_id] = empty_seats
    self.dispute_of_session[session_id] = dispute_id
    log DisputeOpened(
        dispute_id=dispute_id,
        session_id=session_id,
        checkpoint_index=checkpoint_index,
        challenger=msg.sender,
        bundle_hash=bundle_hash,
        transcript_commitment=transcript_commitment,
        bond=bond,
    )
    if bond > 0:
        assert extcall token.transferFrom(
            msg.sender, self, bond, default_return_value=True
        ), "DisputeManager: bond transfer failed"
    return dispute_id


@external
@nonreentrant
def draw(dispute_id: uint256):
    """
    @notice Fill every empty jury seat, from the hash of the dispute's draw block.
    @dev Anyone, from the block after it. Never draws the host, the challenger, the
         depositor or a verifier who sat on this dispute before. A draw block older than
         256 blocks has no hash: the draw is deferred to the current block instead.
    """
    d: Dispute = self.disputes[dispute_id]
    assert d.status == STATUS_OPEN, "DisputeManager: dispute not open"
    assert block.number > d.draw_block, "DisputeManager: draw from the block after the opening"
    if block.number - d.draw_block > 256:
        self.disputes[dispute_id].draw_block = block.number
        log DrawDeferred(dispute_id=dispute_id, draw_block=block.number)
        return
    seed: bytes32 = blockhash(d.draw_block)
    depositor: address = empty(address)
    host: address = empty(address)
    paid: uint256 = 0
    settled_at: uint256 = 0
    depositor, host, paid, settled_at = staticcall marketplace.dispute_facts(d.session_id)
    count: uint256 = staticcall verifier_registry.active_count()
    jury: DynArray[address, MAX_JURY] = self.seats[dispute_id]
    deadline: uint256 = block.timestamp + verdict_period
    drawn: DynArray[address, MAX_JURY] = []
    for seat: uint256 in range(MAX_JURY):
        if seat >= jury_size:
            break
        if jury[seat] != empty(address):
            continue
        assert count > 0, "DisputeManager: not enough verifiers"
        start: uint256 = convert(keccak256(abi_encode(seed, dispute_id, seat)), uint256) % count
        chosen: address = empty(address)
        for step: uint256 in range(min(count, MAX_PROBE), bound=MAX_PROBE):
            candidate: address = staticcall verifier_registry.active_at((start + step) % count)
            if (
                candidate != host
                and candidate != depositor
                and candidate != d.challenger
                and not self.sat[dispute_id][candidate]
            ):
                chosen = candidate
                break
        assert chosen != empty(address), "DisputeManager: not enough verifiers"
        jury[seat] = chosen
        self.sat[dispute_id][chosen] = True
        drawn.append(chosen)
        log JurorDrawn(dispute_id=dispute_id, seat=seat, verifier=chosen, verdict_deadline=deadline)
    assert len(drawn) > 0, "DisputeManager: jury already drawn"
    self.seats[dispute_id] = jury
    self.disputes[dispute_id].verdict_deadline = deadline
    for juror: address in drawn:
        extcall verifier_registry.assign(juror)


@external
@nonreentrant
def submit_verdict(dispute_id: uint256, fraud: bool, signature: Bytes[65]):
    """
    @notice Record a juror's signed verdict; anyone may relay it. The verdict that makes
            a majority resolves the dispute.
    @param dispute_id The dispute.
    @param fraud Whether the juror found fraud.
    @param signature The juror's EIP-712 signature over Verdict(disputeId, fraud).
    """
    d: Dispute = self.disputes[dispute_id]
    assert d.status == STATUS_OPEN, "DisputeManager: dispute not open"
    assert d.verdict_deadline != 0, "DisputeManager: jury not drawn"
    assert block.timestamp <= d.verdict_deadline, "DisputeManager: verdict period has passed"
    juror: address = self._recover(self._verdict_digest(dispute_id, fraud), signature)
    assert juror in self.seats[dispute_id], "DisputeManager: signer is not a juror of this dispute"
    assert self.votes[dispute_id][juror] == 0, "DisputeManager: juror already voted"
    majority: uint256 = jury_size // 2 + 1
    if fraud:
        self.votes[dispute_id][juror] = VOTE_FRAUD
        d.votes_fraud += 1
        self.disputes[dispute_id].votes_fraud = d.votes_fraud
    else:
        self.votes[dispute_id][juror] = VOTE_HONEST
        d.votes_honest += 1
        self.disputes[dispute_id].votes_honest = d.votes_honest
    log VerdictSubmitted(dispute_id=dispute_id, verifier=juror, fraud=fraud)
    if d.votes_fraud >= majority:
        self._resolve(dispute_id, True)
    elif d.votes_honest >= majority:
        self._resolve(dispute_id, False)


@external
@nonreentrant
def replace_silent(dispute_id: uint256):
    """
    @notice After the verdict deadline, take `silent_penalty` from every juror who has
            not voted, empty their seats and let `draw` refill them (the deadline restarts).
    @dev Anyone.
    """
    d: Dispute = self.disputes[dispute_id]
    assert d.status == STATUS_OPEN, "DisputeManager: dispute not open"
    assert d.verdict_deadline != 0, "DisputeManager: jury not drawn"
    assert block.timestamp > d.verdict_deadline, "DisputeManager: verdict period not over"
    jury: DynArray[address, MAX_JURY] = self.seats[dispute_id]
    silent: DynArray[address, MAX_JURY] = []
    for seat: uint256 in range(MAX_JURY):
        if seat >= len(jury):
            break
        if jury[seat] != empty(address) and self.votes[dispute_id][jury[seat]] == 0:
            silent.append(jury[seat])
            jury[seat] = empty(address)
    assert len(silent) > 0, "DisputeManager: no silent juror"
    self.seats[dispute_id] = jury
    self.disputes[dispute_id].draw_block = block.number
    self.disputes[dispute_id].empty_since = block.timestamp
    self.disputes[dispute_id].verdict_deadline = 0
    for juror: address in silent:
        extcall verifier_registry.release(juror)
        taken: uint256 = extcall verifier_registry.penalize(juror, silent_penalty, self)
        self.disputes[dispute_id].penalties += taken
        log JurorReplaced(dispute_id=dispute_id, verifier=juror, penalty=taken)


@external
@nonreentrant
def cancel(dispute_id: uint256):
    """
    @notice End a dispute whose jury could not be seated: a seat has stayed empty for a
            whole verdict period. The bond and any penalties go to the challenger.
    @dev Anyone.
    """
    d: Dispute = self.disputes[dispute_id]
    assert d.status == STATUS_OPEN, "DisputeManager: dispute not open"
    assert d.verdict_deadline == 0, "DisputeManager: the jury is seated"
    assert block.timestamp > d.empty_since + verdict_period, "DisputeManager: the jury may still be drawn"
    self.disputes[dispute_id].status = STATUS_CANCELLED
    self.dispute_of_session[d.session_id] = 0
    self._credit(d.challenger, dispute_id, d.bond + d.penalties)
    log DisputeCancelled(dispute_id=dispute_id)
    for juror: address in self.seats[dispute_id]:
        if juror != empty(address):
            extcall verifier_registry.release(juror)


@external
@nonreentrant
def release_exposure(session_id: uint256):
    """
    @notice After a settled session's dispute window, stop counting what it paid
            against its host's exposure cap. Anyone (the host has the reason to).
    """
    depositor: address = empty(address)
    host: address = empty(address)
    paid: uint256 = 0
    settled_at: uint256 = 0
    depositor, host, paid, settled_at = staticcall marketplace.dispute_facts(session_id)
    assert settled_at != 0, "DisputeManager: session not settled"
    assert block.timestamp > settled_at + dispute_window, "DisputeManager: dispute window still open"
    assert self.dispute_of_session[session_id] == 0, "DisputeManager: a dispute is open on this session"
    assert not self.released[session_id], "DisputeManager: exposure already released"
    self.released[session_id] = True
    log ExposureReleased(session_id=session_id, host=host, amount=paid)
    extcall node_registry.release_exposure(host, paid)


@external
@nonreentrant
def withdraw():
    """
    @notice Withdraw what disputes credited the caller.
    """
    amount: uint256 = self.credit[msg.sender]
    assert amount > 0, "DisputeManager: nothing to withdraw"
    self.credit[msg.sender] = 0
    log Withdrawn(account=msg.sender, amount=amount)
    assert extcall token.transfer(
        msg.sender, amount, default_return_value=True
    ), "DisputeManager: withdrawal transfer failed"


@view
@external
def get_dispute(dispute_id: uint256) -> Dispute:
    """
    @notice Everything stored about a dispute; status 0 means it does not exist.
    """
    return self.disputes[dispute_id]


@view
@external
def jurors(dispute_id: uint256) -> DynArray[address, MAX_JURY]:
    """
    @notice The jury's seats (the zero address: an empty seat).
    """
    return self.seats[dispute_id]


@view
@external
def has_voted(dispute_id: uint256, verifier: address) -> bool:
    """
    @notice Whether a juror's verdict on the dispute is recorded.
    """
    return self.votes[dispute_id][verifier] != 0


@view
@external
def domain_separator() -> bytes32:
    """
    @notice The EIP-712 domain separator verdicts are signed under.
    """
    return self._domain_separator()


@view
@external
def verdict_digest(dispute_id: uint256, fraud: bool) -> bytes32:
    """
    @notice The EIP-712 digest a juror signs for its verdict.
    """
    return self._verdict_digest(dispute_id, fraud)


@internal
def _resolve(dispute_id: uint256, fraud: bool):
    d: Dispute = self.disputes[dispute_id]
    self.disputes[dispute_id].status = STATUS_RESOLVED
    self.disputes[dispute_id].fraud = fraud
    self.dispute_of_session[d.session_id] = 0
    depositor: address = empty(address)
    host: address = empty(address)
    paid: uint256 = 0
    settled_at: uint256 = 0
    depositor, host, paid, settled_at = staticcall marketplace.dispute_facts(d.session_id)
    jury: DynArray[address, MAX_JURY] = self.seats[dispute_id]
    winning: uint8 = VOTE_HONEST
    if fraud:
        winning = VOTE_FRAUD

    slashed: uint256 = 0
    if fraud:
        self.fraudulent[d.session_id] = True
        slashed = min(staticcall node_registry.stake_of(host), paid * penalty_bps // BPS)
        if not self.released[d.session_id]:
            self.released[d.session_id] = True
            extcall node_registry.release_exposure(host, paid)
        if slashed > 0:
            extcall node_registry.slash(host, slashed, self)

    penalties: uint256 = d.penalties
    for juror: address in jury:
        if juror == empty(address):
            continue
        extcall verifier_registry.release(juror)
        vote: uint8 = self.votes[dispute_id][juror]
        if vote != 0 and vote != winning:
            taken: uint256 = extcall verifier_registry.penalize(juror, minority_penalty, self)
            penalties += taken
            log JurorPenalized(dispute_id=dispute_id, verifier=juror, penalty=taken)

    pot: uint256 = slashed + d.bond + penalties
    to_depositor: uint256 = 0
    if fraud:
        to_depositor = min(paid, pot)
        pot -= to_depositor
        self._credit(depositor, dispute_id, to_depositor)
    fees: uint256 = 0
    for juror: address in jury:
        if juror != empty(address) and self.votes[dispute_id][juror] == winning:
            fee: uint256 = min(verifier_fee, pot)
            pot -= fee
            fees += fee
            self._credit(juror, dispute_id, fee)
    to_challenger: uint256 = 0
    to_host: uint256 = 0
    if fraud:
        to_challenger = pot
        self._credit(d.challenger, dispute_id, pot)
    else:
        to_host = pot
        self._credit(host, dispute_id, pot)
    log DisputeResolved(
        dispute_id=dispute_id,
        session_id=d.session_id,
        fraud=fraud,
        slashed=slashed,
        depositor_amount=to_depositor,
        challenger_amount=to_challenger,
        host_amount=to_host,
        verifier_fees=fees,
    )


@internal
def _credit(account: address, dispute_id: uint256, amount: uint256):
    if amount > 0:
        self.credit[account] += amount
        log Credited(account=account, dispute_id=dispute_id, amount=amount)


@view
@internal
def _domain_separator() -> bytes32:
    return keccak256(
        abi_encode(DOMAIN_TYPEHASH, DOMAIN_NAME_HASH, DOMAIN_VERSION_HASH, chain.id, self)
    )


@view
@internal
def _verdict_digest(dispute_id: uint256, fraud: bool) -> bytes32:
    struct_hash: bytes32 = keccak256(abi_encode(VERDICT_TYPEHASH, dispute_id, fraud))
    return keccak256(concat(b"\x19\x01", self._domain_separator(), struct_hash))


@pure
@internal
def _recover(digest: bytes32, signature: Bytes[65]) -> address:
    assert len(signature) == 65, "DisputeManager: signature must be 65 bytes"
    r: uint256 = convert(extract32(signature, 0), uint256)
    s: uint256 = convert(extract32(signature, 32), uint256)
    v: uint256 = convert(slice(signature, 64, 1), uint256)
    assert v == 27 or v == 28, "DisputeManager: bad signature v"
    assert s <= MAX_S, "DisputeManager: malleable signature"
    signer: address = ecrecover(digest, v, r, s)
    assert signer != empty(address), "DisputeManager: invalid signature"
    return signer
