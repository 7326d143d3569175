"""An OpenAI-compatible gateway: any OpenAI client pays hosts per token through inferledger.

```python
from inferledger.gateway import Gateway, GatewayServer

with GatewayServer(Gateway(client, settings)) as server:
    print(server.url)  # OPENAI_BASE_URL for any OpenAI client
```

``inferledger gateway`` runs it from the command line; see docs/gateway.md.
"""

from inferledger.gateway.app import GatewayServer, check_exposure, create_app
from inferledger.gateway.service import Gateway, state_dir

__all__ = ["Gateway", "GatewayServer", "check_exposure", "create_app", "state_dir"]
