"""inferledger's Python SDK: find hosts, open paid sessions, chat, settle, withdraw.

```python
from inferledger.sdk import Client, usdc

client = Client(network="local", key="0x...", deployment="deployment.json")
offer = client.hosts.list(model="org/model.gguf")[0]
with client.sessions.open(offer, None, usdc("2")) as session:
    print(session.chat_sync([{"role": "user", "content": "Hello"}]).text)
print(session.settlement)
```

See docs/sdk.md for the user and host quickstarts.
"""

from inferledger.chain.deployment import Deployment
from inferledger.chain.units import format_usdc, price_per_token_to_mtok, usdc
from inferledger.sdk.client import Client
from inferledger.sdk.errors import (
    ConfigurationError,
    ConnectionLost,
    NodeUnreachable,
    SdkError,
    SessionClosed,
)
from inferledger.sdk.models import HostOffer, SessionStatus, Settlement, Withdrawal
from inferledger.sdk.networks import NETWORKS, Network
from inferledger.sdk.records import SessionRecord
from inferledger.sdk.session import Session
from inferledger.sdk.sessions import ShortSessionWarning
from inferledger.sdk.wire import Reply, SessionError

__all__ = [
    "NETWORKS",
    "Client",
    "ConfigurationError",
    "ConnectionLost",
    "Deployment",
    "HostOffer",
    "Network",
    "NodeUnreachable",
    "Reply",
    "SdkError",
    "Session",
    "SessionClosed",
    "SessionError",
    "SessionRecord",
    "SessionStatus",
    "Settlement",
    "ShortSessionWarning",
    "Withdrawal",
    "format_usdc",
    "price_per_token_to_mtok",
    "usdc",
]
