"""The weights every local backend computes: the approved GGUF requantized to Q8_0.

Why not the GGUF's own tensors: SmolLM2's are Q4_1, which llama.cpp on x86 multiplies one
row at a time (no batched kernel, and its AMX path gets Q4_1 wrong), while transformers
computes their float32 dequantization. A Q8_0 copy runs llama.cpp's batched and AMX kernels,
and when transformers dequantizes that same copy, both sides hold the same weights: what is
left between them is arithmetic, which the ``llama_cpp`` proof profile covers.

The rule is public and reproducible, so any host or verifier derives the same bytes from
the approved file: every tensor stored as F32, F16 or Q8_0 is kept; every other one is
dequantized and quantized to Q8_0 by gguf-py's reference quantizer, which gives the tensor
bytes llama.cpp's own ``llama-quantize --allow-requantize ... Q8_0`` writes
(``tests/inference/test_computed_weights.py``). The metadata is kept, except the file type.
The copy lives next to the converted models, written to a temporary file and renamed into
place, so a crash never leaves half a copy.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from inferledger.paths import remove_stale_temps

RULE = "q8_0/v1"
"""The derivation's name: the computed copy's file name carries it, so a change of rule
never reuses an old copy."""
RULE_TAG = RULE.replace("/", "-")
"""The rule as it appears in cache file names."""
_KEPT = ("F32", "F16", "Q8_0")


def computed_path(gguf_path: Path, gguf_sha256: str, home: Path) -> Path:
    """Where the computed copy of this exact GGUF lives (keyed by content and rule)."""
    return home / "models" / f"{gguf_path.stem}-{gguf_sha256[:16]}.{RULE_TAG}.gguf"


def ensure_computed(gguf_path: Path, gguf_sha256: str, home: Path) -> Path:
    """The computed copy's path, deriving it first (a few seconds) when it is missing."""
    target = computed_path(gguf_path, gguf_sha256, home)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)  # a killed derivation's leftover (about 145 MB for SmolLM2)
    handle, temp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(handle)
    try:
        derive(gguf_path, Path(temp))
        os.replace(temp, target)  # another process's finished copy is the same bytes
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return target


def derive(source: Path, target: Path) -> None:
    """Write ``source`` requantized by the rule above to ``target``."""
    import gguf
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(source)
    writer = GGUFWriter(target, str(reader.fields["general.architecture"].contents()))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # the reader's own header fields; the writer sets the architecture
        value = field.contents()
        if key == "general.file_type":
            value = int(gguf.LlamaFileType.MOSTLY_Q8_0)
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, value_type, sub_type)
    q8_0 = GGMLQuantizationType.Q8_0
    for tensor in reader.tensors:
        data, kind = tensor.data, tensor.tensor_type
        if kind.name not in _KEPT:
            data, kind = gguf.quants.quantize(gguf.quants.dequantize(data, kind), q8_0), q8_0
        writer.add_tensor(tensor.name, data, raw_shape=data.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
