"""Connect to a chain: the embedded py-evm chain or any JSON-RPC URL.

Dev chains (the embedded one, anvil, hardhat) also get time travel, snapshots
and a faucet, through one interface whichever kind is behind it.
"""

from __future__ import annotations

import threading
from typing import Any, cast

import requests
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from web3 import Web3
from web3.providers.eth_tester import EthereumTesterProvider
from web3.providers.rpc.utils import ExceptionRetryConfiguration
from web3.types import RPCEndpoint, Wei

from inferledger.chain.errors import ChainError, ChainUnreachable
from inferledger.chain.redact import redact_url
from inferledger.chain.tx import Nonces, TxSender
from inferledger.config import setting_ref

EMBEDDED = "embedded"
_DEV_CLIENTS = ("anvil", "hardhat", "ganache")


class _LockedTesterProvider(EthereumTesterProvider):
    """eth-tester is not thread-safe; the node reads from worker threads, so serialise."""

    def __init__(self, tester: Any) -> None:
        super().__init__(tester)
        self.lock = threading.RLock()

    def make_request(self, method: Any, params: Any) -> Any:
        with self.lock:
            return super().make_request(method, params)


class Chain:
    """A web3 connection plus what inferledger needs to know about the chain."""

    def __init__(
        self, w3: Web3, url: str, tester: Any | None = None, **sender_defaults: Any
    ) -> None:
        self.w3 = w3
        self.url = url
        self._tester = tester
        self._sender_defaults = sender_defaults
        # Direct eth-tester calls (time travel, snapshots) share the provider's lock.
        if tester is not None:  # connect() made the provider a _LockedTesterProvider
            self.lock = cast(_LockedTesterProvider, w3.provider).lock
        else:
            self.lock = threading.RLock()
        # One sender per key and options, all senders of a key sharing its nonces.
        self._senders: dict[tuple[str, tuple[tuple[str, Any], ...]], TxSender] = {}
        self._nonces: dict[str, Nonces] = {}
        self._senders_lock = threading.Lock()
        try:
            self.chain_id = w3.eth.chain_id
            client = w3.client_version.lower() if tester is None else "eth-tester"
        except Exception as exc:
            # from None: the cause's text quotes the full URL, and tracebacks reach logs.
            raise ChainUnreachable(
                f"cannot reach the chain at {self.endpoint}: {exc.__class__.__name__}; is the "
                f"node running? check the chain URL, {setting_ref('chain_url')}"
            ) from None
        self.client = client
        self.is_dev = tester is not None or any(name in client for name in _DEV_CLIENTS)

    @property
    def endpoint(self) -> str:
        """The URL as messages may show it (``url`` may carry an API key)."""
        return redact_url(self.url)

    @property
    def is_embedded(self) -> bool:
        return self._tester is not None

    def sender(self, account: LocalAccount | str | bytes, **options: Any) -> TxSender:
        """The TxSender for ``account`` (an account or a private key) on this chain.

        The same key always gets the same nonce book: two senders choosing nonces for
        one key on their own would collide.
        """
        signer: LocalAccount = (
            account if isinstance(account, LocalAccount) else Account.from_key(account)
        )
        defaults = {"estimate_block": None if self.is_embedded else "pending"}
        options = {**defaults, **self._sender_defaults, **options}
        key = (signer.address, tuple(sorted(options.items())))
        with self._senders_lock:
            if key not in self._senders:
                nonces = self._nonces.setdefault(signer.address, Nonces())
                self._senders[key] = TxSender(
                    self.w3, signer, url=self.url, nonces=nonces, **options
                )
            return self._senders[key]

    def now(self) -> int:
        """Timestamp of the latest block."""
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def block_number(self) -> int:
        return int(self.w3.eth.block_number)

    # Dev-chain helpers -----------------------------------------------------------

    def _require_dev(self, what: str) -> None:
        if not self.is_dev:
            raise ChainError(f"{what} only works on a dev chain; {self.endpoint} is not one")

    def time_travel(self, seconds: int) -> int:
        """Move chain time forward by ``seconds`` and mine a block; returns the new time."""
        self._require_dev("time travel")
        if self._tester is not None:
            # py-evm mines the travel block one second before the requested time.
            with self.lock:
                self._tester.time_travel(self.now() + seconds + 1)
        else:
            # An exact timestamp, not evm_increaseTime: that moves anvil's clock (the wall
            # clock plus an offset), and the latest block can be ahead of that clock (one
            # mined at a timestamp set by hand), so the travel could land short of it.
            target = self.now() + max(seconds, 1)
            self.w3.provider.make_request(RPCEndpoint("evm_setNextBlockTimestamp"), [target])
            self.w3.provider.make_request(RPCEndpoint("evm_mine"), [])
        return self.now()

    def mine(self) -> None:
        """Mine one empty block."""
        self._require_dev("mining")
        if self._tester is not None:
            with self.lock:
                self._tester.mine_blocks(1)
        else:
            self.w3.provider.make_request(RPCEndpoint("evm_mine"), [])

    def set_automine(self, enabled: bool) -> None:
        """Mine each transaction at once (the default) or leave them pending."""
        self._require_dev("automine")
        if self._tester is not None:
            with self.lock:
                if enabled:
                    self._tester.enable_auto_mine_transactions()
                else:
                    self._tester.disable_auto_mine_transactions()
        else:
            self.w3.provider.make_request(RPCEndpoint("evm_setAutomine"), [enabled])

    def snapshot(self) -> Any:
        """Save the chain state; ``revert(snapshot_id)`` goes back to it."""
        self._require_dev("snapshots")
        if self._tester is not None:
            with self.lock:
                return self._tester.take_snapshot()
        return self.w3.provider.make_request(RPCEndpoint("evm_snapshot"), [])["result"]

    def revert(self, snapshot_id: Any) -> None:
        """Return to a snapshot. On anvil a snapshot can be reverted to only once."""
        self._require_dev("snapshots")
        if self._tester is not None:
            with self.lock:
                self._tester.revert_to_snapshot(snapshot_id)
        else:
            result = self.w3.provider.make_request(RPCEndpoint("evm_revert"), [snapshot_id])
            if not result.get("result"):
                raise ChainError(f"anvil refused to revert to snapshot {snapshot_id}")
        for nonces in self._nonces.values():
            nonces.reset()

    def fund(self, address: str, wei: int) -> None:
        """Give ``address`` ``wei`` of gas money from the dev chain's own funds."""
        self._require_dev("the faucet")
        if self._tester is not None:
            rich = self.w3.eth.accounts[0]
            tx_hash = self.w3.eth.send_transaction({"from": rich, "to": address, "value": Wei(wei)})
            self.w3.eth.wait_for_transaction_receipt(tx_hash)
        else:
            # cast: web3 checks the address at run time; the type only labels it.
            balance = self.w3.eth.get_balance(cast(ChecksumAddress, address)) + wei
            self.w3.provider.make_request(RPCEndpoint("anvil_setBalance"), [address, hex(balance)])


def connect(url: str = EMBEDDED, *, timeout: float = 10.0, **sender_defaults: Any) -> Chain:
    """Open ``url`` (an http(s) JSON-RPC endpoint) or the embedded chain.

    ``sender_defaults`` (gas_cap, receipt_timeout, ...) apply to every ``TxSender``
    made by ``Chain.sender``.
    """
    if url == EMBEDDED:
        from eth_tester import EthereumTester, PyEVMBackend

        tester = EthereumTester(PyEVMBackend())
        return Chain(Web3(_LockedTesterProvider(tester)), url, tester, **sender_defaults)
    if url.startswith(("http://", "https://")):
        # A refused connection is retried briefly; a read timeout is not: a chain that
        # accepts but does not answer should surface after ``timeout``, not after web3's
        # five retries (the node's own backoff and /health take it from there).
        retry = ExceptionRetryConfiguration(
            errors=(requests.exceptions.ConnectionError,), retries=2
        )
        # web3's validation middleware asks the chain id before every call and transaction:
        # an endpoint's chain id does not change, so it is asked once.
        provider = Web3.HTTPProvider(
            url,
            request_kwargs={"timeout": timeout},
            exception_retry_configuration=retry,
            cache_allowed_requests=True,
            cacheable_requests={RPCEndpoint("eth_chainId")},
        )
    else:
        raise ChainError(
            f"unsupported chain URL {redact_url(url)!r}: use 'embedded' or an http(s):// "
            "JSON-RPC URL"
        )
    return Chain(Web3(provider), url, **sender_defaults)
