"""A content-addressed local blob store, keyed by keccak256.

Proof bundles are stored and served by their ``proof_hash``, so the key is the content's own
hash: a blob can be written many times (or by many threads) with the same result, and a read
can check that the file on disk still holds what its name promises.
"""

from __future__ import annotations

from pathlib import Path

from inferledger import paths
from inferledger.chain.keccak import keccak256


class BlobNotFound(KeyError):
    """No blob with the requested hash is stored."""

    def __str__(self) -> str:
        # KeyError would show the repr of its argument; keep the message plain.
        return str(self.args[0])


class CorruptBlob(ValueError):
    """A stored file's content no longer hashes to its name."""


class BlobStore:
    """Blobs under ``root/<first 2 hex digits>/<other 62>`` of their keccak256."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def put(self, data: bytes) -> bytes:
        """Store ``data`` and return its 32-byte hash; a no-op if it is already stored.

        The write is atomic (:func:`inferledger.paths.write_atomic`), so readers never see a
        partial blob, even with concurrent writers.
        """
        digest = keccak256(data)
        path = self._path(digest)
        if not path.exists():
            paths.write_atomic(path, data)
        return digest

    def get(self, digest: bytes) -> bytes:
        """The blob whose keccak256 is ``digest``, checked against it."""
        path = self._path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(f"no blob 0x{digest.hex()} in {self.root}") from None
        if keccak256(data) != digest:
            raise CorruptBlob(f"{path} does not hash to 0x{digest.hex()}")
        return data

    def has(self, digest: bytes) -> bool:
        """Whether a blob named ``digest`` is stored (its content is checked only by get)."""
        return self._path(digest).is_file()

    def _path(self, digest: bytes) -> Path:
        if not isinstance(digest, bytes) or len(digest) != 32:
            raise ValueError(f"a blob hash is 32 bytes, got {digest!r}")
        name = digest.hex()
        return self.root / name[:2] / name[2:]


def default_store() -> BlobStore:
    """The node's proof store, under :func:`inferledger.paths.home`."""
    return BlobStore(paths.home() / "proofs")
