"""Logging set-up shared by the command-line programs (library code only calls logging.getLogger)."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "INFO", prefix: str = "") -> None:
    """One greppable line per event on stderr: time, level, logger, message."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
