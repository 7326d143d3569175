"""Provers turn a checkpoint's work into a proof bundle; the node signs and publishes it.

- ``activation``: TOPLOC proofs over the hidden states the backend computed (see
  :mod:`.activation`), one list per segment following :func:`.activation.segment_chunks`.
- ``commitment``: no model proof; the transcript hash chain plus the host signature commit
  the host to exactly these tokens. ``unproven=True`` marks a fallback after a prover failed.
- ``external``: runs a configured executable (e.g. a zkVM host program), contract below.
- ``mock``: dev chains only; says on every checkpoint that it proves nothing.

Payment never waits on a proof (docs/architecture.md, R4): :func:`prove_checkpoint` falls back
to an unproven commitment whenever the configured prover fails, and says why.

External prover contract (protocol ``inferledger-prover/1``). The node runs the executable
with no arguments, writes ONE JSON object to its stdin, closes it, and reads ONE JSON object
from its stdout. A non-zero exit, anything but a JSON object on stdout, or no answer within
the timeout (the process group is then killed) is a failure; stderr is only quoted in errors.

- Handshake, run by preflight: ``{"op": "version"}`` ->
  ``{"protocol": "inferledger-prover/1", "name": "...", "version": "..."}``.
- Prove: ``{"op": "prove", "protocol": "inferledger-prover/1", "session_id": int,
  "chain_id": int, "marketplace": "0x..", "checkpoint_index": int, "model_id": "0x..",
  "token_start": int, "token_end": int, "transcript_hash": "0x..", "salt": "0x..",
  "segments": [{"prompt_ids": [int, ...], "reply_ids": [int, ...], "reply_start": int},
  ...]}`` -> ``{"attestation": "0x<hex>"}``, stored in the bundle (``prover = "external"``).
  ``reply_ids`` run from the reply's first token to the segment's end. ``transcript_hash``
  is the unsalted chain; ``salt`` is the user's session secret: the attestation is public,
  so anything in it derived from the ids must be keyed with the salt (never the salt itself).

``examples/provers/hash_prover.py`` is a minimal prover speaking this contract.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from inferledger.chain.keccak import keccak256
from inferledger.config import env_name
from inferledger.proofs.activation import build_chunk_proofs, segment_chunks
from inferledger.proofs.bundle import (
    ProofBundle,
    Segment,
    mask_proof,
    prompt_hash,
    sealed_transcript,
)
from inferledger.proofs.sampling import GREEDY, Sampling, seed_commitment

PROTOCOL = "inferledger-prover/1"
PROVER_SETTING = env_name("prover")
PATH_SETTING = env_name("external_prover")
TIMEOUT_SETTING = env_name("external_prover_timeout")

log = logging.getLogger(__name__)
_HEX = re.compile(r"0x(?:[0-9a-fA-F]{2})+")


@dataclass(frozen=True, eq=False)
class SegmentWork:
    """One reply's share of a checkpoint, with the rows an activation prover needs.

    ``reply_ids`` run from the reply's first token up to the segment's end, so
    ``reply_end == len(reply_ids)``. ``hidden_states`` holds float32 rows for
    :attr:`positions` (``None`` when the backend exposes none).
    """

    prompt_ids: tuple[int, ...]
    reply_ids: tuple[int, ...]
    reply_start: int
    hidden_states: np.ndarray | None = None
    sampling: Sampling = GREEDY
    """How the reply was sampled (what the user's prompt asked)."""

    @property
    def reply_end(self) -> int:
        return len(self.reply_ids)

    @property
    def positions(self) -> range:
        """Positions of the rows to commit: the prompt too when the reply starts here."""
        prompt = len(self.prompt_ids)
        return range(
            0 if self.reply_start == 0 else prompt + self.reply_start, prompt + self.reply_end
        )


@dataclass(frozen=True)
class CheckpointWork:
    """Everything a prover needs for one checkpoint; the node fills it from its session."""

    session_id: int
    chain_id: int
    marketplace: str
    checkpoint_index: int
    model_id: bytes
    token_start: int
    token_end: int
    transcript_hash: bytes
    segments: tuple[SegmentWork, ...]
    backend: str
    dtype: str
    salt: bytes
    """The user's session salt (``session_init``): the public bundle's hashes and proofs are
    salted or masked with it, so only the user and those it tells can check them."""
    sampler: str = "none"
    """The backend's sampler (``inference.sampling.SAMPLER`` for models that prove)."""


class ProverUnavailable(Exception):
    """The configured prover cannot run here; found by preflight, before any paid session."""

    def __init__(self, prover: str, detail: str, setting: str, fix: str) -> None:
        self.prover, self.detail, self.setting, self.fix = prover, detail, setting, fix
        super().__init__(self.line())

    def line(self) -> str:
        """One line naming the prover, what is wrong, the setting and the fix."""
        return f"prover {self.prover!r}: {self.detail}; setting {self.setting}; fix: {self.fix}"


class ProverFailed(Exception):
    """A prover could not prove one checkpoint; the node falls back to a commitment."""


class _Timeout(ProverFailed):
    """The external prover did not answer in time (a different setting fixes it)."""


class Prover(Protocol):
    """Makes the unsigned bundle of a checkpoint."""

    name: str
    needs_hidden_states: bool

    def preflight(self) -> str:
        """A one-line OK detail, or raise :class:`ProverUnavailable`."""
        ...

    def prove(self, work: CheckpointWork) -> ProofBundle:
        """The unsigned bundle; raise :class:`ProverFailed` when it cannot be made."""
        ...


class ActivationProver:
    """TOPLOC activation proofs over the states the backend computed while generating."""

    name = "activation"
    needs_hidden_states = True

    def preflight(self) -> str:
        return "TOPLOC activation proofs over the backend's hidden states"

    def prove(self, work: CheckpointWork) -> ProofBundle:
        proofs = [_activation_proofs(i, segment) for i, segment in enumerate(work.segments)]
        return _bundle(work, self.name, proofs=proofs)


class CommitmentProver:
    """No model proof: the transcript hash chain and the host signature are the commitment."""

    name = "commitment"
    needs_hidden_states = False

    def __init__(self, unproven: bool = False) -> None:
        self.unproven = unproven

    def preflight(self) -> str:
        return "transcript hash chain and host signature only (no model proof)"

    def prove(self, work: CheckpointWork) -> ProofBundle:
        return _bundle(work, self.name, unproven=self.unproven)


class MockProver:
    """Dev chains only (docs/architecture.md, R5): a ``mock`` bundle that proves nothing."""

    name = "mock"
    needs_hidden_states = False

    def preflight(self) -> str:
        return "MOCK proofs prove nothing (dev chain only)"

    def prove(self, work: CheckpointWork) -> ProofBundle:
        log.warning(
            "mock prover: checkpoint %d of session %d gets a mock proof, which proves nothing",
            work.checkpoint_index,
            work.session_id,
        )
        return _bundle(work, self.name)


class ExternalProver:
    """Runs an executable speaking ``inferledger-prover/1`` (see the module docstring)."""

    name = "external"
    needs_hidden_states = False

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.timeout = timeout

    def preflight(self) -> str:
        self._check_file()
        try:
            answer = self._call({"op": "version"})
        except _Timeout as error:
            fix = f"raise {TIMEOUT_SETTING} or fix the prover"
            raise self._handshake_failed(str(error), fix, TIMEOUT_SETTING) from error
        except ProverFailed as error:
            raise self._handshake_failed(str(error)) from error
        if answer.get("protocol") != PROTOCOL:
            got = answer.get("protocol")
            raise self._handshake_failed(f"answered protocol {got!r}, expected {PROTOCOL!r}")
        name, version = answer.get("name"), answer.get("version")
        if not isinstance(name, str) or not isinstance(version, str):
            raise self._handshake_failed("answer lacks name and version strings")
        return f"external prover {name} {version} at {self.path}"

    def prove(self, work: CheckpointWork) -> ProofBundle:
        answer = self._call(_prove_request(work))
        attestation = answer.get("attestation")
        if not isinstance(attestation, str) or not _HEX.fullmatch(attestation):
            raise ProverFailed(f"{self.path} answered without an attestation (non-empty 0x hex)")
        return _bundle(work, self.name, attestation=bytes.fromhex(attestation[2:]))

    def _check_file(self) -> None:
        path = self.path
        if not path.exists():
            fix = f"install the prover there or point {PATH_SETTING} at it"
            raise self._unavailable(f"external prover {path} not found", fix)
        if not path.is_file():
            fix = f"point {PATH_SETTING} at the prover executable"
            raise self._unavailable(f"external prover {path} is not a file", fix)
        if not os.access(path, os.X_OK):
            fix = f"`chmod +x {path}` or point {PATH_SETTING} at the installed prover"
            raise self._unavailable(f"external prover {path} is not executable", fix)

    def _handshake_failed(
        self, reason: str, fix: str | None = None, setting: str = PATH_SETTING
    ) -> ProverUnavailable:
        fix = fix or f'make it answer {{"op": "version"}} on stdin with protocol {PROTOCOL}'
        return self._unavailable(
            f"external prover {self.path}: handshake failed: {reason}", fix, setting
        )

    def _unavailable(self, detail: str, fix: str, setting: str = PATH_SETTING) -> ProverUnavailable:
        return ProverUnavailable(self.name, detail, setting, fix)

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request, one answer. A new session lets a timeout kill the whole group."""
        try:
            process = subprocess.Popen(
                [str(self.path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as error:
            raise ProverFailed(f"could not start {self.path}: {error}") from error
        try:
            out, err = process.communicate(json.dumps(request).encode(), timeout=self.timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise _Timeout(f"no answer within {self.timeout:g} s (killed)") from None
        if process.returncode != 0:
            stderr = err.decode(errors="replace").strip().splitlines()
            said = f": {stderr[-1][:200]}" if stderr else ""
            raise ProverFailed(f"exited with status {process.returncode}{said}")
        try:
            answer = json.loads(out)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise ProverFailed("did not answer with one JSON object")
        return answer


def make_prover(
    name: str,
    *,
    dev_chain: bool,
    hidden_states: bool,
    external_path: Path | None = None,
    external_timeout: float = 30.0,
) -> Prover:
    """The prover the settings ask for, or :class:`ProverUnavailable` saying why not."""
    if name == "auto":
        return ActivationProver() if hidden_states else CommitmentProver()
    if name == "activation":
        if not hidden_states:
            fix = f"use prover commitment ({PROVER_SETTING}=commitment)"
            raise ProverUnavailable(
                name, "the backend exposes no hidden states", PROVER_SETTING, fix
            )
        return ActivationProver()
    if name == "commitment":
        return CommitmentProver()
    if name == "external":
        if external_path is None:
            fix = f"set {PATH_SETTING} to the prover executable"
            raise ProverUnavailable(name, "no external prover configured", PATH_SETTING, fix)
        return ExternalProver(external_path, external_timeout)
    if name == "mock":
        if not dev_chain:
            detail = "mock proofs are refused on a non-dev chain"
            raise ProverUnavailable(name, detail, PROVER_SETTING, "use prover auto or commitment")
        return MockProver()
    fix = "choose auto, activation, commitment, external or mock"
    raise ProverUnavailable(name, "unknown prover", PROVER_SETTING, fix)


@dataclass(frozen=True)
class ProvedCheckpoint:
    """A signed bundle ready to store and to quote in a receipt request."""

    bundle: ProofBundle
    encoded: bytes
    proof_hash: bytes
    fell_back: bool
    error: str | None
    seconds: float


def prove_checkpoint(prover: Prover, work: CheckpointWork, host_key: bytes) -> ProvedCheckpoint:
    """Prove and sign one checkpoint; blocking, so the node runs it off its event loop.

    Any failure of ``prover`` falls back to an unproven commitment, so a broken prover never
    blocks payment; ``error`` says what went wrong.
    """
    started = time.perf_counter()
    error = None
    try:
        bundle = prover.prove(work)
    except Exception as exc:
        text = str(exc) if isinstance(exc, ProverFailed) else f"{type(exc).__name__}: {exc}"
        error = f"{prover.name} prover failed: {' '.join(text.split())}"
        log.warning(
            "checkpoint %d of session %d: %s; falling back to an unproven commitment",
            work.checkpoint_index,
            work.session_id,
            error,
        )
        bundle = CommitmentProver(unproven=True).prove(work)
    signed = bundle.signed(host_key)
    encoded = signed.encode()
    return ProvedCheckpoint(
        bundle=signed,
        encoded=encoded,
        proof_hash=keccak256(encoded),
        fell_back=error is not None,
        error=error,
        seconds=time.perf_counter() - started,
    )


def _activation_proofs(index: int, segment: SegmentWork) -> tuple[bytes, ...]:
    rows, positions = segment.hidden_states, segment.positions
    if rows is None:
        raise ProverFailed(f"segment {index}: the backend gave no hidden states")
    if rows.ndim != 2 or rows.shape[0] != len(positions):
        raise ProverFailed(
            f"segment {index}: hidden states of shape {rows.shape}, expected {len(positions)} "
            f"rows for positions [{positions.start}, {positions.stop})"
        )
    chunks = segment_chunks(len(segment.prompt_ids), segment.reply_start, segment.reply_end)
    try:
        return tuple(build_chunk_proofs(rows, positions.start, chunks))
    except ValueError as error:
        raise ProverFailed(f"segment {index}: {error}") from error


def _bundle(
    work: CheckpointWork,
    prover: str,
    *,
    proofs: Sequence[tuple[bytes, ...]] | None = None,
    unproven: bool = False,
    attestation: bytes = b"",
) -> ProofBundle:
    """The unsigned bundle for ``work``; only the proof fields differ between provers."""
    segments = tuple(
        Segment(
            prompt_hash=prompt_hash(segment.prompt_ids, work.salt),
            prompt_tokens=len(segment.prompt_ids),
            reply_start=segment.reply_start,
            reply_end=segment.reply_end,
            activation_proofs=tuple(
                mask_proof(proof, work.salt, work.checkpoint_index, index, chunk)
                for chunk, proof in enumerate(segment_proofs)
            ),
            temperature=float(segment.sampling.temperature),
            top_p=float(segment.sampling.top_p),
            repetition_penalty=float(segment.sampling.repetition_penalty),
            seed_commitment=seed_commitment(segment.sampling.effective_seed, work.salt),
        )
        for index, (segment, segment_proofs) in enumerate(
            zip(work.segments, proofs or [()] * len(work.segments), strict=True)
        )
    )
    return ProofBundle(
        session_id=work.session_id,
        chain_id=work.chain_id,
        marketplace=work.marketplace,
        checkpoint_index=work.checkpoint_index,
        model_id=work.model_id,
        token_start=work.token_start,
        token_end=work.token_end,
        transcript_hash=sealed_transcript(work.transcript_hash, work.salt),
        segments=segments,
        prover=prover,
        unproven=unproven,
        backend=work.backend,
        dtype=work.dtype,
        sampler=work.sampler,
        attestation=attestation,
    )


def _prove_request(work: CheckpointWork) -> dict[str, Any]:
    return {
        "op": "prove",
        "protocol": PROTOCOL,
        "session_id": work.session_id,
        "chain_id": work.chain_id,
        "marketplace": work.marketplace,
        "checkpoint_index": work.checkpoint_index,
        "model_id": "0x" + work.model_id.hex(),
        "token_start": work.token_start,
        "token_end": work.token_end,
        "transcript_hash": "0x" + work.transcript_hash.hex(),
        "salt": "0x" + work.salt.hex(),
        "segments": [
            {
                "prompt_ids": list(segment.prompt_ids),
                "reply_ids": list(segment.reply_ids),
                "reply_start": segment.reply_start,
            }
            for segment in work.segments
        ],
    }
