"""Chunked byte transfers: large objects move as ~1 MiB frames so no gRPC message limit caps them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

CHUNK_SIZE = 1 << 20


def iter_file_chunks(path: Path, offset: int = 0, chunk_size: int = CHUNK_SIZE) -> Iterator[tuple[int, bytes]]:
    """Yield (offset, data) frames of `path` from `offset` to its end; frames are at most `chunk_size` bytes."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        while True:
            data = fh.read(chunk_size)
            if not data:
                return
            yield offset, data
            offset += len(data)
