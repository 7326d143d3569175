"""Fixtures for the inference tests.

The real SmolLM2 backend (``smollm``) lives in tests/conftest.py and is built once per
session. It uses the normal model cache (``$INFERLEDGER_HOME`` or ``~/.cache/inferledger``),
so only the first run on a machine pays for the GGUF conversion. One torch thread keeps
the tests steady when other processes (or xdist workers) share the two cores.
"""
