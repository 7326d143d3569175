"""Typed wrappers around the deployed contracts.

Reads are plain methods; writes take the ``TxSender`` that acts, so tests and
tools say explicitly who does what. Every revert surfaces as ``ContractRevert``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from eth_typing import ChecksumAddress
from web3.contract import Contract
from web3.logs import DISCARD
from web3.types import TxReceipt

from inferledger.chain.compile import compile_all
from inferledger.chain.connect import Chain
from inferledger.chain.deployment import Deployment
from inferledger.chain.errors import translate
from inferledger.chain.receipts import ReceiptDomain
from inferledger.chain.tx import TxSender
from inferledger.chain.units import Prices, Split, settlement_split

STATUS_OPEN = 1
STATUS_SETTLED = 2
DISPUTE_OPEN = 1
DISPUTE_RESOLVED = 2
DISPUTE_CANCELLED = 3
ZERO_ADDRESS = "0x" + "00" * 20


@dataclass(frozen=True)
class SessionInfo:
    """A session as stored by JobMarketplace (status 0: no such session)."""

    session_id: int
    depositor: str
    host: str
    signer: str
    model_id: bytes
    deposit: int
    input_price_per_mtok: int
    output_price_per_mtok: int
    fee_bps: int
    proof_interval: int
    created_at: int
    expires_at: int
    close_requested_at: int
    input_tokens_paid: int
    output_tokens_paid: int
    proof_hash: bytes
    checkpoints: int
    status: int

    @property
    def exists(self) -> bool:
        return self.status != 0

    @property
    def is_open(self) -> bool:
        return self.status == STATUS_OPEN

    @property
    def is_settled(self) -> bool:
        return self.status == STATUS_SETTLED

    def paid_split(self) -> Split:
        """What settling at the paid counts pays, by the contract's formula."""
        return settlement_split(
            self.deposit,
            self.input_tokens_paid,
            self.output_tokens_paid,
            self.input_price_per_mtok,
            self.output_price_per_mtok,
            self.fee_bps,
        )


@dataclass(frozen=True)
class HostInfo:
    address: str
    api_url: str
    stake: int
    active: bool
    registered: bool
    unbonding_ends_at: int
    open_sessions: int
    exposure: int
    """Deposits of open sessions plus what settled ones paid, until their dispute window
    is released; at most ``stake * exposure_bps / 10000``."""


@dataclass(frozen=True)
class VerifierInfo:
    url: str
    stake: int
    active: bool
    registered: bool
    unbonding_ends_at: int
    assignments: int


@dataclass(frozen=True)
class DisputeInfo:
    """A dispute as stored; ``session_id`` 0: there is no such dispute. ``jurors`` are the
    seats (the zero address: empty)."""

    session_id: int
    checkpoint_index: int
    challenger: str
    bundle_hash: bytes
    transcript_commitment: bytes
    bond: int
    opened_at: int
    draw_block: int
    empty_since: int
    verdict_deadline: int
    status: int
    fraud: bool
    votes_fraud: int
    votes_honest: int
    penalties: int
    jurors: tuple[str, ...] = ()

    @property
    def seated(self) -> list[str]:
        """The jurors in their seats, empty seats left out."""
        return [j for j in self.jurors if int(j, 16) != 0]


@dataclass(frozen=True)
class DisputeFacts:
    """What a dispute reads of a session; ``settled_at`` 0: not settled yet."""

    depositor: str
    host: str
    paid: int
    settled_at: int


@dataclass(frozen=True)
class SettlementEvent:
    """What a settlement paid, read from its SessionSettled event."""

    session_id: int
    input_tokens: int
    output_tokens: int
    host_amount: int
    fee: int
    refund: int
    refund_credited: bool
    tx_hash: str
    block_number: int = 0


@dataclass(frozen=True)
class SessionEvent:
    """A marketplace log that ends or closes a session, as the node's watcher reads it."""

    name: str  # "CloseRequested" or "SessionSettled"
    session_id: int
    block_number: int
    tx_hash: str


WATCHED_EVENTS = ("CloseRequested", "SessionSettled")


class _Wrapper:
    def __init__(self, chain: Chain, contract: Contract) -> None:
        self.chain = chain
        self.contract = contract

    @property
    def address(self) -> str:
        return self.contract.address

    def _read(self, name: str, *args: Any, block: int | None = None) -> Any:
        """Call view ``name``, at ``block`` (default: the latest)."""
        try:
            return getattr(self.contract.functions, name)(*args).call(block_identifier=block)
        except Exception as exc:
            raise translate(exc, name, self.chain.url) from exc

    def _write(self, sender: TxSender, name: str, *args: Any) -> TxReceipt:
        return sender.transact(getattr(self.contract.functions, name)(*args), name)

    def _events(self, name: str, receipt: TxReceipt) -> list[Any]:
        """This contract's ``name`` events in ``receipt`` (other contracts' logs skipped)."""
        return list(getattr(self.contract.events, name)().process_receipt(receipt, errors=DISCARD))


class Token(_Wrapper):
    def balance_of(self, account: str) -> int:
        return int(self._read("balanceOf", account))

    def allowance(self, owner: str, spender: str) -> int:
        return int(self._read("allowance", owner, spender))

    def approve(self, sender: TxSender, spender: str, amount: int) -> TxReceipt:
        return self._write(sender, "approve", spender, amount)

    def transfer(self, sender: TxSender, to: str, amount: int) -> TxReceipt:
        return self._write(sender, "transfer", to, amount)

    def mint(self, sender: TxSender, to: str, amount: int) -> TxReceipt:
        """TestUSDC only."""
        return self._write(sender, "mint", to, amount)

    def set_blocked(self, sender: TxSender, account: str, blocked: bool) -> TxReceipt:
        """TestUSDC only: simulate USDC's blacklist."""
        return self._write(sender, "set_blocked", account, blocked)


class ModelRegistry(_Wrapper):
    def approve_model(self, sender: TxSender, name: str, weights_sha256: bytes) -> bytes:
        receipt = self._write(sender, "approve_model", name, weights_sha256)
        (event,) = self._events("ModelApproved", receipt)
        return bytes(event["args"]["model_id"])

    def revoke_model(self, sender: TxSender, model_id: bytes) -> TxReceipt:
        return self._write(sender, "revoke_model", model_id)

    def is_approved(self, model_id: bytes) -> bool:
        return bool(self._read("is_approved", model_id))

    def weights_sha256(self, model_id: bytes) -> bytes:
        return bytes(self._read("models", model_id)[1])

    def model_name(self, model_id: bytes) -> str:
        """The name ``model_id`` was approved under ("" if it never was)."""
        return str(self._read("models", model_id)[0])


class NodeRegistry(_Wrapper):
    def register(
        self,
        sender: TxSender,
        api_url: str,
        prices: Mapping[bytes, tuple[int, int]],
        stake: int,
    ) -> TxReceipt:
        """Register the sender as a host.

        ``prices`` maps model id -> (input, output) price per Mtok (a ``Prices`` fits).
        """
        return self._write(sender, "register", api_url, *_price_columns(prices), stake)

    def set_models(self, sender: TxSender, prices: Mapping[bytes, tuple[int, int]]) -> TxReceipt:
        """Replace the sender's models and prices (model id -> (input, output) per Mtok)."""
        return self._write(sender, "set_models", *_price_columns(prices))

    def update_url(self, sender: TxSender, api_url: str) -> TxReceipt:
        return self._write(sender, "update_url", api_url)

    def add_stake(self, sender: TxSender, amount: int) -> TxReceipt:
        return self._write(sender, "add_stake", amount)

    def request_unstake(self, sender: TxSender) -> TxReceipt:
        return self._write(sender, "request_unstake")

    def cancel_unstake(self, sender: TxSender) -> TxReceipt:
        return self._write(sender, "cancel_unstake")

    def withdraw_stake(self, sender: TxSender) -> TxReceipt:
        return self._write(sender, "withdraw_stake")

    def get_host(self, host: str) -> HostInfo:
        return HostInfo(host, *self._read("get_host", host))

    def prices_of(self, host: str, model_id: bytes) -> Prices:
        """The host's (input, output) prices per Mtok for ``model_id``; output 0: not served."""
        return Prices(
            self._read("input_price_per_mtok", host, model_id),
            self._read("output_price_per_mtok", host, model_id),
        )

    def host_models(self, host: str) -> list[bytes]:
        return [bytes(m) for m in self._read("host_models", host)]

    def hosts(self) -> list[str]:
        return [self._read("host_at", i) for i in range(self._read("host_count"))]


def _price_columns(
    prices: Mapping[bytes, tuple[int, int]],
) -> tuple[list[bytes], list[int], list[int]]:
    """The contract's three parallel arrays: model ids, input prices, output prices."""
    return (
        list(prices),
        [input_price for input_price, _ in prices.values()],
        [output_price for _, output_price in prices.values()],
    )


class VerifierRegistry(_Wrapper):
    """Staked verifiers that juries are drawn from."""

    def register(self, sender: TxSender, url: str, stake: int) -> TxReceipt:
        return self._write(sender, "register", url, stake)

    def update_url(self, sender: TxSender, url: str) -> TxReceipt:
        return self._write(sender, "update_url", url)

    def add_stake(self, sender: TxSender, amount: int) -> TxReceipt:
        return self._write(sender, "add_stake", amount)

    def request_unstake(self, sender: TxSender) -> TxReceipt:
        return self._write(sender, "request_unstake")

    def cancel_unstake(self, sender: TxSender) -> TxReceipt:
        return self._write(sender, "cancel_unstake")

    def withdraw_stake(self, sender: TxSender) -> TxReceipt:
        return self._write(sender, "withdraw_stake")

    def get_verifier(self, verifier: str) -> VerifierInfo:
        return VerifierInfo(*self._read("get_verifier", verifier))

    def min_stake(self) -> int:
        return int(self._read("min_stake"))

    def active_verifiers(self) -> list[str]:
        return [self._read("active_at", i) for i in range(self._read("active_count"))]


class Disputes(_Wrapper):
    """The DisputeManager: open, draw, verdicts, replacements, releases, credits."""

    def open_dispute(
        self,
        sender: TxSender,
        session_id: int,
        checkpoint_index: int,
        bundle_hash: bytes,
        host_signature: bytes,
        transcript_commitment: bytes,
    ) -> int:
        """Open a dispute (the bond must be approved); its id."""
        receipt = self._write(
            sender,
            "open_dispute",
            session_id,
            checkpoint_index,
            bundle_hash,
            host_signature,
            transcript_commitment,
        )
        return int(self._events("DisputeOpened", receipt)[0]["args"]["dispute_id"])

    def draw(self, sender: TxSender, dispute_id: int) -> TxReceipt:
        return self._write(sender, "draw", dispute_id)

    def submit_verdict(
        self, sender: TxSender, dispute_id: int, fraud: bool, signature: bytes
    ) -> TxReceipt:
        return self._write(sender, "submit_verdict", dispute_id, fraud, signature)

    def replace_silent(self, sender: TxSender, dispute_id: int) -> TxReceipt:
        return self._write(sender, "replace_silent", dispute_id)

    def cancel(self, sender: TxSender, dispute_id: int) -> TxReceipt:
        return self._write(sender, "cancel", dispute_id)

    def release_exposure(self, sender: TxSender, session_id: int) -> TxReceipt:
        return self._write(sender, "release_exposure", session_id)

    def withdraw(self, sender: TxSender) -> TxReceipt:
        return self._write(sender, "withdraw")

    def get_dispute(self, dispute_id: int) -> DisputeInfo:
        # Both reads at one block: a draw landing between them would pair a seated jury
        # with the deadline of an unseated one (a juror then saw its deadline long past).
        block = self.chain.block_number()
        stored = self._read("get_dispute", dispute_id, block=block)
        jurors = tuple(self._read("jurors", dispute_id, block=block))
        return DisputeInfo(*(*stored, jurors))

    def has_voted(self, dispute_id: int, verifier: str) -> bool:
        return bool(self._read("has_voted", dispute_id, verifier))

    def dispute_of_session(self, session_id: int) -> int:
        return int(self._read("dispute_of_session", session_id))

    def dispute_count(self) -> int:
        return int(self._read("dispute_count"))

    def credit(self, account: str) -> int:
        return int(self._read("credit", account))

    def verdict_digest(self, dispute_id: int, fraud: bool) -> bytes:
        return bytes(self._read("verdict_digest", dispute_id, fraud))

    def domain(self) -> ReceiptDomain:
        """The EIP-712 domain verdicts are signed under (this contract, this chain)."""
        return ReceiptDomain(self.chain.chain_id, self.address)

    def bond(self) -> int:
        return int(self._read("bond"))

    def jury_size(self) -> int:
        return int(self._read("jury_size"))

    def verdict_period(self) -> int:
        return int(self._read("verdict_period"))

    def dispute_window(self) -> int:
        return int(self._read("dispute_window"))

    def verifier_fee(self) -> int:
        return int(self._read("verifier_fee"))

    def penalty_bps(self) -> int:
        return int(self._read("penalty_bps"))

    def silent_penalty(self) -> int:
        return int(self._read("silent_penalty"))

    def minority_penalty(self) -> int:
        return int(self._read("minority_penalty"))

    def is_released(self, session_id: int) -> bool:
        return bool(self._read("released", session_id))

    def is_fraudulent(self, session_id: int) -> bool:
        return bool(self._read("fraudulent", session_id))


class HostEarnings(_Wrapper):
    def balance_of(self, host: str, token: str) -> int:
        return int(self._read("balance_of", host, token))

    def withdraw(self, sender: TxSender, token: str) -> TxReceipt:
        return self._write(sender, "withdraw", token)

    def withdraw_many(self, sender: TxSender, tokens: list[str]) -> TxReceipt:
        return self._write(sender, "withdraw_many", tokens)


class Marketplace(_Wrapper):
    def domain(self) -> ReceiptDomain:
        return ReceiptDomain(chain_id=self.chain.chain_id, marketplace=self.address)

    def create_session(
        self,
        sender: TxSender,
        *,
        host: str,
        model_id: bytes,
        deposit: int,
        max_input_price_per_mtok: int,
        max_output_price_per_mtok: int,
        max_duration: int,
        proof_interval: int,
        session_signer: str,
    ) -> int:
        """Open a session (the deposit must be approved) and return its id.

        The session is priced at the host's registered prices, which must not exceed
        the two maxima.
        """
        receipt = self._write(
            sender,
            "create_session",
            host,
            model_id,
            deposit,
            max_input_price_per_mtok,
            max_output_price_per_mtok,
            max_duration,
            proof_interval,
            session_signer,
        )
        (event,) = self._events("SessionCreated", receipt)
        return int(event["args"]["session_id"])

    def submit_checkpoint(
        self,
        sender: TxSender,
        session_id: int,
        input_tokens: int,
        output_tokens: int,
        proof_hash: bytes,
        proof_uri: str,
        signature: bytes,
    ) -> TxReceipt:
        """Put the receipt for these cumulative counts on chain (host only)."""
        return self._write(
            sender,
            "submit_checkpoint",
            session_id,
            input_tokens,
            output_tokens,
            proof_hash,
            proof_uri,
            signature,
        )

    def complete_session(
        self,
        sender: TxSender,
        session_id: int,
        input_tokens: int,
        output_tokens: int,
        proof_hash: bytes,
        proof_uri: str,
        signature: bytes,
    ) -> SettlementEvent:
        """Final checkpoint and settlement (host only); counts equal to the paid ones
        need no signature."""
        receipt = self._write(
            sender,
            "complete_session",
            session_id,
            input_tokens,
            output_tokens,
            proof_hash,
            proof_uri,
            signature,
        )
        return self.settlement_from(receipt)

    def request_close(self, sender: TxSender, session_id: int) -> TxReceipt:
        return self._write(sender, "request_close", session_id)

    def finalize(self, sender: TxSender, session_id: int) -> SettlementEvent:
        return self.settlement_from(self._write(sender, "finalize", session_id))

    def withdraw_refund(self, sender: TxSender) -> TxReceipt:
        return self._write(sender, "withdraw_refund")

    def withdraw_treasury(self, sender: TxSender) -> TxReceipt:
        return self._write(sender, "withdraw_treasury")

    def set_fee_bps(self, sender: TxSender, fee_bps: int) -> TxReceipt:
        return self._write(sender, "set_fee_bps", fee_bps)

    def set_treasury(self, sender: TxSender, treasury: str) -> TxReceipt:
        return self._write(sender, "set_treasury", treasury)

    def settlement_from(self, receipt: TxReceipt) -> SettlementEvent:
        """Parse the SessionSettled (and any RefundCredited) event of a settling tx."""
        (settled,) = self._events("SessionSettled", receipt)
        credited = self._events("RefundCredited", receipt)
        args = settled["args"]
        return SettlementEvent(
            session_id=args["session_id"],
            input_tokens=args["input_tokens"],
            output_tokens=args["output_tokens"],
            host_amount=args["host_amount"],
            fee=args["fee"],
            refund=args["refund"],
            refund_credited=bool(credited),
            tx_hash=receipt["transactionHash"].to_0x_hex(),
            block_number=int(receipt["blockNumber"]),
        )

    def get_session(self, session_id: int) -> SessionInfo:
        fields = self._read("get_session", session_id)
        info = SessionInfo(session_id, *fields)
        return SessionInfo(
            **{
                **info.__dict__,
                "model_id": bytes(info.model_id),
                "proof_hash": bytes(info.proof_hash),
            }
        )

    def session_deadline(self, session_id: int) -> int:
        return int(self._read("session_deadline", session_id))

    def sessions_of_user(self, user: str, cursor: int = 0, limit: int = 100) -> list[int]:
        """Session ids ``user`` created, newest first; pass the last id as ``cursor`` to page."""
        return list(self._read("sessions_of_user", user, cursor, limit))

    def sessions_of_host(self, host: str, cursor: int = 0, limit: int = 100) -> list[int]:
        """Session ids with ``host``, newest first; pass the last id as ``cursor`` to page."""
        return list(self._read("sessions_of_host", host, cursor, limit))

    def treasury_balance(self) -> int:
        return int(self._read("treasury_balance"))

    def refund_credit(self, account: str) -> int:
        return int(self._read("refund_credit", account))

    def open_deposits(self) -> int:
        return int(self._read("open_deposits"))

    def fee_bps(self) -> int:
        return int(self._read("fee_bps"))

    def close_window(self) -> int:
        return int(self._read("close_window"))

    def receipt_digest(
        self, session_id: int, input_tokens: int, output_tokens: int, proof_hash: bytes
    ) -> bytes:
        """The contract's EIP-712 digest of a receipt (to check Python's against)."""
        return bytes(
            self._read("receipt_digest", session_id, input_tokens, output_tokens, proof_hash)
        )

    def treasury(self) -> str:
        """The address that may withdraw the fees (it can change after deployment)."""
        return str(self._read("treasury"))

    def dispute_facts(self, session_id: int) -> DisputeFacts:
        return DisputeFacts(*self._read("dispute_facts", session_id))

    def paid_of(self, session_id: int) -> tuple[int, int]:
        """(host share, fee) a settled session paid; (0, 0) before it settles."""
        info = self.get_session(session_id)
        if not info.is_settled:
            return (0, 0)
        split = info.paid_split()
        return (split.host, split.fee)

    def session_events(self, from_block: int, to_block: int) -> list[SessionEvent]:
        """CloseRequested and SessionSettled logs of blocks ``from_block..to_block``: one
        ``eth_getLogs`` call however many sessions are open."""
        events = {name: getattr(self.contract.events, name)() for name in WATCHED_EVENTS}
        topics = {str(event.topic).lower(): event for event in events.values()}
        query = {
            "address": self.address,
            "fromBlock": from_block,
            "toBlock": to_block,
            "topics": [list(topics)],
        }
        try:
            logs = self.chain.w3.eth.get_logs(query)  # type: ignore[arg-type]
        except Exception as exc:
            raise translate(exc, "read session logs", self.chain.url) from exc
        found = []
        for entry in logs:
            event = topics.get("0x" + bytes(entry["topics"][0]).hex())
            if event is None:
                continue
            decoded = event.process_log(entry)
            found.append(
                SessionEvent(
                    name=decoded["event"],
                    session_id=int(decoded["args"]["session_id"]),
                    block_number=int(entry["blockNumber"]),
                    tx_hash=entry["transactionHash"].to_0x_hex(),
                )
            )
        return found

    def settlement_event(self, session_id: int, from_block: int = 0) -> SettlementEvent | None:
        """What settled ``session_id``, read back from its SessionSettled log; None if not yet.

        ``from_block``: search from here (the session's creation block keeps RPC log
        queries small on long chains).
        """
        try:
            logs = self.contract.events.SessionSettled().get_logs(
                argument_filters={"session_id": session_id}, from_block=from_block
            )
        except Exception as exc:
            raise translate(exc, "read SessionSettled logs", self.chain.url) from exc
        if not logs:
            return None
        tx_hash = logs[-1]["transactionHash"]
        try:
            receipt = self.chain.w3.eth.get_transaction_receipt(tx_hash)
        except Exception as exc:
            raise translate(exc, "read the settlement receipt", self.chain.url) from exc
        return self.settlement_from(receipt)


@dataclass
class Contracts:
    """All inferledger contracts of one deployment, wrapped."""

    chain: Chain
    deployment: Deployment
    token: Token
    models: ModelRegistry
    nodes: NodeRegistry
    earnings: HostEarnings
    marketplace: Marketplace
    verifiers: VerifierRegistry
    disputes: Disputes

    @classmethod
    def attach(cls, chain: Chain, deployment: Deployment) -> Contracts:
        """Wrap the contracts of ``deployment``; the chain id must match."""
        from inferledger.chain.errors import ChainError

        if chain.chain_id != deployment.chain_id:
            raise ChainError(
                f"deployment is for chain id {deployment.chain_id} but {chain.endpoint} is chain "
                f"id {chain.chain_id}: point the chain URL setting at the right chain or redeploy"
            )
        compiled = compile_all()
        addresses = deployment.addresses

        def bind(name: str, address: str) -> Contract:
            # cast: web3 checks the address at run time; the type only labels it.
            return chain.w3.eth.contract(
                address=cast(ChecksumAddress, address), abi=compiled[name].abi
            )

        return cls(
            chain=chain,
            deployment=deployment,
            token=Token(chain, bind("TestUSDC", addresses.token)),
            models=ModelRegistry(chain, bind("ModelRegistry", addresses.model_registry)),
            nodes=NodeRegistry(chain, bind("NodeRegistry", addresses.node_registry)),
            earnings=HostEarnings(chain, bind("HostEarnings", addresses.host_earnings)),
            marketplace=Marketplace(chain, bind("JobMarketplace", addresses.marketplace)),
            verifiers=VerifierRegistry(
                chain, bind("VerifierRegistry", addresses.verifier_registry)
            ),
            disputes=Disputes(chain, bind("DisputeManager", addresses.disputes)),
        )
