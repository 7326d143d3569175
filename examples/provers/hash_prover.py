#!/usr/bin/env python3
"""A minimal external prover for inferledger (protocol ``inferledger-prover/1``), stdlib only.

It proves nothing about the model: its attestation is the sha256 of the canonical request
(JSON, sorted keys, no whitespace). It shows the contract a real prover (e.g. a zkVM host
program) implements, and serves as the external prover in tests.

Contract: the node runs this executable with no arguments, writes ONE JSON object to stdin
and reads ONE JSON object from stdout; it kills the process on timeout. Any non-zero exit or
non-JSON answer is a failure (stderr is quoted in the node's error).

- ``{"op": "version"}`` -> ``{"protocol": "inferledger-prover/1", "name": ..., "version": ...}``
- ``{"op": "prove", "protocol": "inferledger-prover/1", "session_id", "chain_id",
  "marketplace", "checkpoint_index", "model_id": "0x..", "token_start", "token_end",
  "transcript_hash": "0x..", "salt": "0x..", "segments": [{"prompt_ids", "reply_ids",
  "reply_start"}]}`` -> ``{"attestation": "0x<hex>"}``. The hash covers the session's
  secret ``salt``, so nobody without it can recompute the attestation from guessed prompts.

Fault flags, for tests: ``--crash-on-prove`` (exit 3), ``--hang-on-prove`` (never answers),
``--wrong-protocol`` (handshake names another protocol).

Use: ``export INFERLEDGER_PROVER=external INFERLEDGER_EXTERNAL_PROVER=$PWD/hash_prover.py``.
"""

import argparse
import hashlib
import json
import sys
import time

PROTOCOL = "inferledger-prover/1"


def canonical(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def main() -> int:
    parser = argparse.ArgumentParser(description="hash-only inferledger prover")
    parser.add_argument("--crash-on-prove", action="store_true")
    parser.add_argument("--hang-on-prove", action="store_true")
    parser.add_argument("--wrong-protocol", action="store_true")
    flags = parser.parse_args()

    request = json.load(sys.stdin)
    op = request.get("op") if isinstance(request, dict) else None
    if op == "version":
        protocol = "other-prover/9" if flags.wrong_protocol else PROTOCOL
        answer = {"protocol": protocol, "name": "hash_prover", "version": "1.0"}
    elif op == "prove" and request.get("protocol") == PROTOCOL:
        if flags.crash_on_prove:
            print("hash_prover: crashing on purpose (--crash-on-prove)", file=sys.stderr)
            return 3
        while flags.hang_on_prove:
            time.sleep(3600)
        answer = {"attestation": "0x" + hashlib.sha256(canonical(request)).hexdigest()}
    else:
        print(f"hash_prover: unsupported request op={op!r}", file=sys.stderr)
        return 2
    sys.stdout.write(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
