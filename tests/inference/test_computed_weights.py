"""The computed copy: the approved GGUF requantized to Q8_0, the same bytes for every host,
verifier and backend (llama.cpp computes it, transformers dequantizes it)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize

from inferledger.inference import computed_weights
from inferledger.inference.computed_weights import computed_path, derive, ensure_computed
from inferledger.inference.model_cache import find_packaged_gguf
from inferledger.paths import STALE_TEMP_SECONDS

SHA = "ab" * 32


@pytest.fixture(scope="module")
def derived(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("computed") / "copy.gguf"
    derive(find_packaged_gguf(), target)
    return target


def tensors(path: Path) -> dict[str, Any]:
    return {tensor.name: tensor for tensor in GGUFReader(path).tensors}


def raw(tensor: Any) -> bytes:
    return np.ascontiguousarray(tensor.data).tobytes()


def test_only_the_tensors_llama_cpp_cannot_batch_are_requantized(derived: Path) -> None:
    source, copy = tensors(find_packaged_gguf()), tensors(derived)
    assert source.keys() == copy.keys()
    requantized = 0
    for name, original in source.items():
        kind = original.tensor_type.name
        mine = copy[name]
        if kind in ("F32", "F16", "Q8_0"):
            assert mine.tensor_type.name == kind and raw(mine) == raw(original), name
            continue
        requantized += 1
        assert mine.tensor_type.name == "Q8_0"
        values = dequantize(original.data, original.tensor_type)
        blocks = values.reshape(-1, 32)
        err = np.abs(dequantize(mine.data, mine.tensor_type).reshape(-1, 32) - blocks)
        # Half a Q8_0 step (amax / 127), plus the scale's own float16 rounding.
        assert (err.max(1) <= 0.57 * np.abs(blocks).max(1) / 127 + 1e-12).all(), name
    assert requantized == 210  # SmolLM2's Q4_1 tensors; the embeddings are Q8_0 already
    fields = GGUFReader(derived).fields
    assert fields["general.file_type"].contents() == 7  # MOSTLY_Q8_0
    assert fields["tokenizer.ggml.tokens"].contents() == (
        GGUFReader(find_packaged_gguf()).fields["tokenizer.ggml.tokens"].contents()
    )


def test_the_rule_gives_the_same_bytes_every_time(derived: Path, tmp_path: Path) -> None:
    again = tmp_path / "again.gguf"
    derive(find_packaged_gguf(), again)
    assert (
        hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(derived.read_bytes()).digest()
    )


def test_the_tensors_are_those_llama_cpps_own_quantize_writes(
    derived: Path, tmp_path: Path
) -> None:
    """Anyone can check the copy with llama.cpp's tool: same tensors, byte for byte (its
    file orders them differently)."""
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="the llama extra: bash scripts/llama-wheel.sh"
    )
    theirs = tmp_path / "llama.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    params.nthread = 1
    status = llama_cpp.llama_model_quantize(
        str(find_packaged_gguf()).encode(), str(theirs).encode(), ctypes.byref(params)
    )
    assert status == 0
    mine, other = tensors(derived), tensors(theirs)
    assert mine.keys() == other.keys()
    for name, tensor in mine.items():
        assert tensor.tensor_type == other[name].tensor_type, name
        assert raw(tensor) == raw(other[name]), name


def test_transformers_computes_the_copys_weights_exactly(smollm: Any) -> None:
    """The float32 weights transformers multiplies are the copy's Q8_0 values, not the
    GGUF's own Q4_1 ones."""
    home = smollm.model_dir.parent.parent
    copy = tensors(computed_path(smollm.weights_path, smollm.weights_sha256, home))
    tensor = copy["blk.0.ffn_down.weight"]
    expected = dequantize(tensor.data, tensor.tensor_type)
    weight = smollm._model.model.layers[0].mlp.down_proj.weight.detach().numpy()
    np.testing.assert_array_equal(weight, expected)
    original = tensors(find_packaged_gguf())["blk.0.ffn_down.weight"]
    assert not np.array_equal(weight, dequantize(original.data, original.tensor_type))


def test_the_copy_is_derived_once_and_never_left_half_written(monkeypatch, tmp_path: Path) -> None:
    source = tmp_path / "tiny.Q4.gguf"
    source.write_bytes(b"GGUF fake")
    calls: list[Path] = []

    def fake(src: Path, target: Path) -> None:
        calls.append(target)
        target.write_bytes(b"copy")

    monkeypatch.setattr(computed_weights, "derive", fake)
    first = ensure_computed(source, SHA, tmp_path)
    assert first == ensure_computed(source, SHA, tmp_path) == computed_path(source, SHA, tmp_path)
    assert first.name == f"tiny.Q4-{SHA[:16]}.q8_0-v1.gguf" and first.read_bytes() == b"copy"
    assert len(calls) == 1 and calls[0] != first  # written aside, then renamed

    def crash(src: Path, target: Path) -> None:
        target.write_bytes(b"ha")
        raise OSError("disk full")

    monkeypatch.setattr(computed_weights, "derive", crash)
    with pytest.raises(OSError, match="disk full"):
        ensure_computed(source, "cd" * 32, tmp_path)
    assert sorted(path.name for path in (tmp_path / "models").iterdir()) == [first.name]


def test_a_killed_derivations_leftover_is_removed_once_stale(monkeypatch, tmp_path: Path) -> None:
    """A derivation killed outright (no ``finally``) leaves its temp file; the next one
    deletes it once it is older than any live derivation, and leaves a young one alone."""
    source = tmp_path / "tiny.Q4.gguf"
    source.write_bytes(b"GGUF fake")
    monkeypatch.setattr(computed_weights, "derive", lambda src, target: target.write_bytes(b"c"))
    target = computed_path(source, SHA, tmp_path)
    target.parent.mkdir(parents=True)
    old = target.parent / f".{target.name}.tmp-killed"
    young = target.parent / f".{target.name}.tmp-running"
    old.write_bytes(b"half")
    young.write_bytes(b"half")
    an_hour_ago = time.time() - STALE_TEMP_SECONDS - 1
    os.utime(old, (an_hour_ago, an_hour_ago))
    ensure_computed(source, SHA, tmp_path)
    assert not old.exists() and young.exists() and target.read_bytes() == b"c"
