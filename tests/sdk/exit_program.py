"""A user program for test_exit.py: opens a session, chats, then never closes it.

argv: chain URL, deployment file, sessions dir, node URL, host, model id (hex), mode.
mode "exit" returns from the script; "wait" prints "ready" and sleeps until a signal.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from inferledger.sdk import Client, usdc

url, deployment, sessions, node, host, model, mode = sys.argv[1:8]
client = Client(url, deployment=Path(deployment), sessions_dir=Path(sessions))
session = client.sessions.open(host, model, usdc("1"), url=node)
session.chat_sync([{"role": "user", "content": "hello"}], max_tokens=7)
print(session.id, flush=True)
if mode == "wait":
    print("ready", flush=True)
    time.sleep(120)
