"""fedvlm's on-disk cache of built artefacts (model presets, converted pretrained weights): where it is, and how a
directory gets into it exactly once."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)
_BUILD_LOCK = threading.RLock()  # builds seed the global torch RNG: one per process at a time (a build may nest)


def default_cache_dir() -> Path:
    """``$FEDVLM_CACHE`` if set, else ``~/.cache/fedvlm``."""
    env = os.environ.get("FEDVLM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fedvlm"


def build_once(final: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """Return ``final``, first running ``build(tmp)`` into a temporary sibling and renaming it into place unless
    ``final/marker`` already exists.

    Guarantees: ``final`` is complete whenever it exists (the marker is written by ``build`` last, the rename is
    atomic); concurrent builders in other processes are safe (the loser of the rename discards its copy); a failed
    build leaves nothing behind.
    """
    if (final / marker).is_file():
        return final
    with _BUILD_LOCK:
        if (final / marker).is_file():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            build(tmp)
            try:
                os.rename(tmp, final)
                logger.info("built %s", final)
            except OSError:
                if not (final / marker).is_file():
                    raise
                logger.info("%s was built concurrently by another process; using it", final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final
