"""Content-addressed blob files: a blob's name is the SHA-256 of its bytes, written by atomic rename."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fedvlm.atomic import fsync_dir, write_bytes_atomic


class BlobStore:
    """Immutable files under `root/<2 hex>/<sha256>`; a present file always holds exactly its digest's bytes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.root / digest[:2] / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()

    def put_bytes(self, data: bytes) -> str:
        """Store `data` and return its digest; idempotent."""
        digest = hashlib.sha256(data).hexdigest()
        target = self.path(digest)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(target, data)
        return digest

    def adopt(self, src: Path, digest: str) -> Path:
        """Move an already verified file (same filesystem) into the store under `digest`."""
        target = self.path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, target)
        fsync_dir(target.parent)
        return target

    def read(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read in chunks (memory stays small for any size)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()

