# pragma version 0.4.3
# pragma evm-version cancun
"""
@title ModelRegistry
@notice Models the owner has approved for paid sessions. A model's id is
        keccak256("repo/file"); the weights' sha256 is stored so a node can
        check that the file it serves is the approved one.
@license Apache-2.0
"""

struct Model:
    name: String[128]
    weights_sha256: bytes32
    approved: bool

event ModelApproved:
    model_id: indexed(bytes32)
    name: String[128]
    weights_sha256: bytes32

event ModelRevoked:
    model_id: indexed(bytes32)

event OwnershipTransferred:
    previous_owner: indexed(address)
    new_owner: indexed(address)

owner: public(address)
models: public(HashMap[bytes32, Model])
model_count: public(uint256)
model_at: public(HashMap[uint256, bytes32])


@deploy
def __init__():
    self.owner = msg.sender
    log OwnershipTransferred(previous_owner=empty(address), new_owner=msg.sender)


@external
def approve_model(name: String[128], weights_sha256: bytes32) -> bytes32:
    """
    @notice Approve the model `name` ("repo/file") with the given weights hash.
    @dev Re-approving an id updates its hash; revoked ids can be approved again.
    @param name The model's "repo/file" name; not empty.
    @param weights_sha256 sha256 of the weights file; not zero.
    @return The model id, keccak256 of `name`.
    """
    assert msg.sender == self.owner, "ModelRegistry: caller is not the owner"
    assert len(name) > 0, "ModelRegistry: empty model name"
    assert weights_sha256 != empty(bytes32), "ModelRegistry: empty weights hash"
    model_id: bytes32 = keccak256(name)
    if len(self.models[model_id].name) == 0:
        self.model_at[self.model_count] = model_id
        self.model_count += 1
    self.models[model_id] = Model(name=name, weights_sha256=weights_sha256, approved=True)
    log ModelApproved(model_id=model_id, name=name, weights_sha256=weights_sha256)
    return model_id


@external
def revoke_model(model_id: bytes32):
    """
    @notice Withdraw approval of `model_id`; open sessions are not affected.
    @param model_id An approved model.
    """
    assert msg.sender == self.owner, "ModelRegistry: caller is not the owner"
    assert self.models[model_id].approved, "ModelRegistry: model not approved"
    self.models[model_id].approved = False
    log ModelRevoked(model_id=model_id)


@external
def transfer_ownership(new_owner: address):
    """
    @notice Hand the owner role to `new_owner`.
    @param new_owner The next owner; not the zero address.
    """
    assert msg.sender == self.owner, "ModelRegistry: caller is not the owner"
    assert new_owner != empty(address), "ModelRegistry: new owner is the zero address"
    log OwnershipTransferred(previous_owner=self.owner, new_owner=new_owner)
    self.owner = new_owner


@view
@external
def is_approved(model_id: bytes32) -> bool:
    """
    @notice Whether `model_id` may be used for new sessions.
    """
    return self.models[model_id].approved
