"""The content-addressed blob store: layout, idempotence, corruption and concurrent writers."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from eth_utils import keccak

from inferledger.store.blobs import BlobNotFound, BlobStore, CorruptBlob, default_store


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


def test_put_get_has(store: BlobStore) -> None:
    digest = store.put(b"bundle bytes")
    assert digest == keccak(b"bundle bytes")
    assert store.has(digest)
    assert store.get(digest) == b"bundle bytes"
    name = digest.hex()
    assert (store.root / name[:2] / name[2:]).read_bytes() == b"bundle bytes"
    assert store.put(b"") == keccak(b"")
    assert store.get(keccak(b"")) == b""


def test_put_is_idempotent(store: BlobStore) -> None:
    assert store.put(b"same") == store.put(b"same")
    files = [p for p in store.root.rglob("*") if p.is_file()]
    assert len(files) == 1  # no temp files left behind


def test_missing_blob(store: BlobStore) -> None:
    digest = keccak(b"never stored")
    assert not store.has(digest)
    with pytest.raises(BlobNotFound) as info:
        store.get(digest)
    assert isinstance(info.value, KeyError)
    assert str(info.value) == f"no blob 0x{digest.hex()} in {store.root}"
    assert "\n" not in str(info.value)


def test_corruption_is_detected(store: BlobStore) -> None:
    digest = store.put(b"honest")
    name = digest.hex()
    (store.root / name[:2] / name[2:]).write_bytes(b"garbage")
    assert store.has(digest)
    with pytest.raises(CorruptBlob, match=name):
        store.get(digest)


def test_rejects_malformed_hash(store: BlobStore) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        store.get(b"\x00" * 31)


def test_concurrent_puts_of_one_blob(store: BlobStore) -> None:
    data = b"x" * 1_000_000
    barrier = threading.Barrier(8)
    results: list[bytes] = []

    def put() -> None:
        barrier.wait()
        results.append(store.put(data))

    threads = [threading.Thread(target=put) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [keccak(data)] * 8
    assert store.get(keccak(data)) == data
    assert [p.name for p in store.root.rglob("*") if p.is_file()] == [keccak(data).hex()[2:]]


def test_default_store_lives_in_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERLEDGER_HOME", str(tmp_path))
    assert default_store().root == tmp_path / "proofs"
