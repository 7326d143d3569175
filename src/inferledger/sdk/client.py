"""The SDK's entry point: a chain, a deployment and (optionally) an account.

``Client()`` with no arguments uses the environment: ``INFERLEDGER_NETWORK`` or
``INFERLEDGER_CHAIN_URL`` (default: the embedded chain), ``INFERLEDGER_KEY`` and
``INFERLEDGER_DEPLOYMENT_FILE`` (default ``./deployment.json``), so the same program
runs on the embedded chain, anvil and Base Sepolia unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount

from inferledger.chain.connect import EMBEDDED, Chain, connect
from inferledger.chain.contracts import Contracts
from inferledger.chain.deployment import Deployment
from inferledger.chain.tx import TxSender
from inferledger.config import env_name
from inferledger.sdk.disputes import Disputes
from inferledger.sdk.errors import ConfigurationError
from inferledger.sdk.hosts import HostAccount, Hosts, Treasury
from inferledger.sdk.networks import Network, check_chain, embedded_chain, get_network
from inferledger.sdk.records import RecordStore
from inferledger.sdk.sessions import Sessions

KEY_ENV = "INFERLEDGER_KEY"
DEPLOYMENT_ENV = env_name("deployment_file")
CHAIN_URL_ENV = env_name("chain_url")
DEFAULT_DEPLOYMENT = Path("deployment.json")


class Client:
    """Talks to one inferledger deployment on one chain, as one account.

    ``chain``: "embedded", a JSON-RPC URL, or a connected ``Chain``. ``network``: a
    preset ("embedded", "local", "base-sepolia") giving the URL when ``chain`` is not
    given and the chain id (and USDC) the chain must have. ``key``: the account's
    private key (default ``$INFERLEDGER_KEY``); only needed to send transactions.
    ``deployment``: a ``Deployment`` or the path of its JSON record. ``sessions_dir``:
    where session records live (default ``$INFERLEDGER_HOME/sessions``).
    ``plaintext_sessions``: ask nodes for unencrypted sessions; dev chains only, and only
    nodes started with ``allow_plaintext_sessions`` grant them.
    """

    def __init__(
        self,
        chain: str | Chain | None = None,
        *,
        key: str | bytes | None = None,
        deployment: Deployment | Path | str | None = None,
        network: str | None = None,
        sessions_dir: Path | None = None,
        plaintext_sessions: bool = False,
    ) -> None:
        network = network or os.environ.get("INFERLEDGER_NETWORK") or None
        self.network: Network | None = get_network(network) if network else None
        self.chain = _connect(chain, self.network)
        if plaintext_sessions and not self.chain.is_dev:
            raise ConfigurationError(
                "plaintext_sessions is for dev chains only: on this chain every session is "
                "end-to-end encrypted; drop the option"
            )
        self.plaintext_sessions = plaintext_sessions
        if self.network is not None:
            check_chain(self.chain, self.network)
        self.deployment = _load_deployment(deployment, self.chain)
        if self.deployment.chain_id != self.chain.chain_id:
            raise ConfigurationError(
                f"the deployment is for chain id {self.deployment.chain_id} but {self.chain.url} "
                f"is chain id {self.chain.chain_id}: use that chain's deployment record"
            )
        usdc = self.network.usdc if self.network else None
        if usdc and self.deployment.addresses.token.lower() != usdc.lower():
            raise ConfigurationError(
                f"the deployment pays in {self.deployment.addresses.token}, not "
                f"{self.network.name}'s USDC {usdc}"  # type: ignore[union-attr]
            )
        self.contracts = Contracts.attach(self.chain, self.deployment)
        self._account = _account(key)
        self._sender: TxSender | None = None
        self.hosts = Hosts(self)
        self.host = HostAccount(self)
        self.treasury = Treasury(self)
        self.disputes = Disputes(self)
        self.sessions = Sessions(self, RecordStore(sessions_dir))

    def __repr__(self) -> str:
        return f"<Client chain={self.chain.url} id={self.chain.chain_id} account={self.address}>"

    @property
    def address(self) -> str | None:
        """This client's account address; None without a key."""
        return self._account.address if self._account else None

    @property
    def account(self) -> LocalAccount:
        if self._account is None:
            raise ConfigurationError(
                f"no key: pass key= or set {KEY_ENV} to the account's private key (0x-hex)"
            )
        return self._account

    @property
    def sender(self) -> TxSender:
        """Sends this account's transactions (one per client, so nonces stay in order)."""
        if self._sender is None:
            self._sender = self.chain.sender(self.account)
        return self._sender

    def balance(self, address: str | None = None) -> int:
        """Payment-token balance of ``address`` (default: this account), in base units."""
        return self.contracts.token.balance_of(address or self.account.address)


def _connect(chain: str | Chain | None, network: Network | None) -> Chain:
    if isinstance(chain, Chain):
        return chain
    url = chain or (network.rpc_url if network else None)
    url = url or os.environ.get(CHAIN_URL_ENV) or EMBEDDED
    return embedded_chain() if url == EMBEDDED else connect(url)


def _load_deployment(deployment: Deployment | Path | str | None, chain: Chain) -> Deployment:
    if isinstance(deployment, Deployment):
        return deployment
    path = Path(deployment) if deployment is not None else None
    if path is None and os.environ.get(DEPLOYMENT_ENV):
        path = Path(os.environ[DEPLOYMENT_ENV])
    if path is None and DEFAULT_DEPLOYMENT.exists():
        path = DEFAULT_DEPLOYMENT
    if path is None:
        where = (
            "the embedded chain starts empty: deploy onto it in this process and pass the "
            "Deployment"
            if chain.url == EMBEDDED
            else "run `inferledger deploy`"
        )
        raise ConfigurationError(
            f"no deployment: pass deployment= (a Deployment or its JSON file) or set "
            f"{DEPLOYMENT_ENV}; {where}"
        )
    try:
        return Deployment.load(path.expanduser())
    except FileNotFoundError:
        raise ConfigurationError(
            f"deployment file {path} not found: run `inferledger deploy` or set {DEPLOYMENT_ENV}"
        ) from None
    except ValueError as exc:
        raise ConfigurationError(
            f"deployment file {path} is not a deployment record: {exc}"
        ) from None


def _account(key: str | bytes | None) -> LocalAccount | None:
    key = key or os.environ.get(KEY_ENV) or None
    if key is None:
        return None
    try:
        account: LocalAccount = Account.from_key(key)
        return account
    except Exception:
        raise ConfigurationError(
            f"the key (key= or {KEY_ENV}) is not a valid private key: expected 32 bytes of 0x-hex"
        ) from None
