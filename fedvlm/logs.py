"""Logging set-up shared by the command-line programs (library code only calls logging.getLogger)."""

from __future__ import annotations

import logging
import sys


class _CurrentStderr(logging.StreamHandler):
    """A handler on the `sys.stderr` of each moment, not the one at set-up: a command run in-process (typer's
    CliRunner in tests, an embedding program) swaps `sys.stderr` and closes its stand-in afterwards, and a daemon
    thread logging later must not hit the closed one."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # StreamHandler.__init__ assigns it; the property always reads sys.stderr
        pass


def setup_logging(level: str = "INFO", prefix: str = "") -> None:
    """One greppable line per event on stderr: time, level, logger, message."""
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
