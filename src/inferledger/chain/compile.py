"""Compile the Vyper contracts in process, cached on the sources' hash.

The cache key covers every source file, the compiler version and the EVM version,
so an edited contract or a compiler upgrade can never reuse stale bytecode.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from inferledger.paths import home

EVM_VERSION = "cancun"
CONTRACT_NAMES = (
    "TestUSDC",
    "ModelRegistry",
    "NodeRegistry",
    "HostEarnings",
    "JobMarketplace",
    "VerifierRegistry",
    "DisputeManager",
)


@dataclass(frozen=True)
class CompiledContract:
    """ABI and creation bytecode of one contract."""

    name: str
    abi: list[dict[str, Any]]
    bytecode: str


def _sources() -> dict[str, str]:
    package = resources.files("inferledger.contracts")
    return {name: package.joinpath(f"{name}.vy").read_text() for name in CONTRACT_NAMES}


def _cache_key(sources: dict[str, str]) -> str:
    import vyper

    digest = hashlib.sha256(f"vyper={vyper.__version__};evm={EVM_VERSION}".encode())
    for name in sorted(sources):
        digest.update(name.encode() + b"\0" + sources[name].encode() + b"\0")
    return digest.hexdigest()[:16]


def compile_source(name: str, source: str) -> CompiledContract:
    """Compile one Vyper source with the project's pinned EVM version (no cache)."""
    import vyper
    from vyper.compiler.settings import Settings

    result = vyper.compile_code(
        source,
        output_formats=["abi", "bytecode"],
        settings=Settings(evm_version=EVM_VERSION),
    )
    return CompiledContract(name, result["abi"], result["bytecode"])


def _compile(sources: dict[str, str]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, source in sources.items():
        compiled = compile_source(name, source)
        out[name] = {"abi": compiled.abi, "bytecode": compiled.bytecode}
    return out


def compile_all(cache_dir: Path | None = None) -> dict[str, CompiledContract]:
    """Compiled contracts by name, from the cache when the sources are unchanged."""
    sources = _sources()
    cache_dir = cache_dir or home() / "contracts"
    cache_file = cache_dir / f"{_cache_key(sources)}.json"
    if cache_file.exists():
        artifacts = json.loads(cache_file.read_text())
    else:
        artifacts = _compile(sources)
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a concurrent or interrupted run never reads half a file.
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(artifacts, handle)
        os.replace(tmp, cache_file)
    return {name: CompiledContract(name, **artifacts[name]) for name in CONTRACT_NAMES}
