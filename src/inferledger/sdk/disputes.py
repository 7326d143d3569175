"""Disputing a checkpoint: ``client.disputes``.

The challenger (the depositor, or anyone holding the session's record) opens a dispute on
one host-signed bundle with a bond, committing on chain to the transcript it will reveal.
Once the jury is drawn, the transcript and the bundle go to each juror's registered URL,
and only there (docs/disputes.md). The jurors re-run the verification and sign verdicts;
at a majority the contract settles the dispute by itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

from inferledger.chain.contracts import DISPUTE_OPEN, DisputeInfo
from inferledger.chain.errors import ContractRevert
from inferledger.proofs.bundle import ProofBundle
from inferledger.proofs.evidence import RevealedReply, Transcript
from inferledger.sdk.errors import SdkError
from inferledger.sdk.verification import BundleUnavailable, checkpoints, fetch_bundle

if TYPE_CHECKING:
    from inferledger.sdk.client import Client
    from inferledger.sdk.records import SessionRecord

DELIVERY_TIMEOUT = 30.0
POLL = 0.25
DRAW_WAIT = 120.0


def transcript_of(record: SessionRecord) -> Transcript:
    """What the jurors need from a record: prompts, parameters, token ids and the salt,
    never the session signer key."""
    return Transcript(
        session_id=record.session_id,
        chain_id=record.chain_id,
        marketplace=record.marketplace,
        host=record.host,
        model_id=record.model_id,
        salt="0x" + record.salt.hex(),
        replies=[
            RevealedReply(
                messages=reply.messages,
                params=reply.params,
                first_token=reply.first_token,
                token_ids=reply.token_ids,
            )
            for reply in record.replies
        ],
    )


def find_bundle(record: SessionRecord, checkpoint_index: int) -> ProofBundle:
    """The host-signed bundle of the session's checkpoint ``checkpoint_index`` (the index
    the host wrote into it), fetched from the node by the receipts that name it."""
    seen = []
    for point in checkpoints(record):
        try:
            bundle = fetch_bundle(point)
        except BundleUnavailable as exc:
            raise SdkError(f"cannot dispute checkpoint {checkpoint_index}: {exc}") from exc
        if bundle.checkpoint_index == checkpoint_index:
            return bundle
        seen.append(bundle.checkpoint_index)
    raise SdkError(
        f"session {record.session_id} has no checkpoint {checkpoint_index} among its receipted "
        f"bundles ({', '.join(map(str, seen)) or 'none'}): pick one of those"
    )


@dataclass(frozen=True)
class Delivery:
    """What one juror said to the evidence: ``ok`` (it took it, or the dispute was decided
    before it needed it: ``late``), or why not."""

    juror: str
    url: str
    ok: bool
    message: str
    late: bool = False


class Disputes:
    """Open, follow and collect disputes as this client's account."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def open(
        self, record: SessionRecord, checkpoint_index: int, bundle: ProofBundle | None = None
    ) -> int:
        """Open a dispute on ``checkpoint_index`` of the session ``record`` keeps; pulls the
        deployment's bond (approved here). Returns the dispute id."""
        contracts = self._client.contracts
        bundle = bundle or find_bundle(record, checkpoint_index)
        transcript = transcript_of(record)
        bond = contracts.disputes.bond()
        sender = self._client.sender
        if contracts.token.allowance(sender.address, contracts.disputes.address) < bond:
            contracts.token.approve(sender, contracts.disputes.address, bond)
        try:
            return contracts.disputes.open_dispute(
                sender,
                record.session_id,
                bundle.checkpoint_index,
                bundle.signing_hash(),
                bundle.host_signature,
                transcript.commitment(),
            )
        except ContractRevert as exc:
            raise SdkError(f"cannot open the dispute: {exc}") from exc

    def draw(self, dispute_id: int) -> list[str]:
        """Draw the jury (anyone may, from the block after the opening); the jurors."""
        disputes = self._client.contracts.disputes
        info = disputes.get_dispute(dispute_id)
        if len(info.seated) == disputes.jury_size():
            return info.seated
        chain = self._client.chain
        deadline = time.monotonic() + DRAW_WAIT
        while chain.block_number() <= info.draw_block:  # the draw hashes the opening block
            if chain.is_dev:
                chain.mine()
            elif time.monotonic() > deadline:
                raise SdkError(f"no block after the opening of dispute {dispute_id} yet: retry")
            else:
                time.sleep(POLL)
        try:
            disputes.draw(self._client.sender, dispute_id)
        except ContractRevert as exc:
            if disputes.get_dispute(dispute_id).verdict_deadline == 0:  # nobody drew it
                raise SdkError(f"cannot draw the jury of dispute {dispute_id}: {exc}") from exc
        return disputes.get_dispute(dispute_id).seated

    def deliver(
        self, dispute_id: int, record: SessionRecord, bundle: ProofBundle | None = None
    ) -> list[Delivery]:
        """Send the bundle and the committed transcript to every drawn juror's URL."""
        contracts = self._client.contracts
        info = contracts.disputes.get_dispute(dispute_id)
        bundle = bundle or find_bundle(record, info.checkpoint_index)
        body = {
            "bundle": "0x" + bundle.encode().hex(),
            "transcript": "0x" + transcript_of(record).encode().hex(),
        }
        results = []
        with httpx.Client(timeout=DELIVERY_TIMEOUT) as http:
            for juror in info.seated:
                url = contracts.verifiers.get_verifier(juror).url.rstrip("/")
                target = f"{url}/v1/disputes/{dispute_id}/evidence"
                try:
                    response = http.post(target, json=body)
                except httpx.HTTPError as exc:
                    results.append(Delivery(juror, target, False, f"{type(exc).__name__}: {exc}"))
                    continue
                if response.status_code == 409 and not self._open(dispute_id):
                    # The others' votes decided it first: this juror's is not needed.
                    results.append(Delivery(juror, target, True, "dispute decided", late=True))
                    continue
                ok = response.status_code == 200
                results.append(Delivery(juror, target, ok, response.text[:200]))
        return results

    def _open(self, dispute_id: int) -> bool:
        return self._client.contracts.disputes.get_dispute(dispute_id).status == DISPUTE_OPEN

    def wait(self, dispute_id: int, timeout: float = 600.0) -> DisputeInfo:
        """Poll until the dispute is resolved or cancelled (SdkError after ``timeout``)."""
        disputes = self._client.contracts.disputes
        deadline = time.monotonic() + timeout
        while True:
            info = disputes.get_dispute(dispute_id)
            if info.status != DISPUTE_OPEN:
                return info
            if time.monotonic() > deadline:
                raise SdkError(
                    f"dispute {dispute_id} is still open after {timeout:.0f} s "
                    f"({info.votes_fraud} fraud / {info.votes_honest} honest votes): "
                    "`inferledger dispute show` follows it"
                )
            time.sleep(POLL)

    def show(self, dispute_id: int) -> DisputeInfo:
        return self._client.contracts.disputes.get_dispute(dispute_id)

    def credit(self) -> int:
        """What resolved disputes owe this account (bond back, reward, refund, fee)."""
        return self._client.contracts.disputes.credit(self._client.sender.address)

    def withdraw(self) -> int:
        """Withdraw this account's dispute credit; the amount."""
        amount = self.credit()
        if amount == 0:
            raise SdkError("no dispute credit to withdraw")
        self._client.contracts.disputes.withdraw(self._client.sender)
        return amount
