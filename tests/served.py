"""A real coordinator served in the test's own process: `fedvlm-coord init`'s directory, the daemon's `Coordinator`
(coordinator/server.py) with its mutual-TLS gRPC servers on loopback, its SQLite state and blob store. No process
of its own, so a test reaches its objects (e.g. a part file's size) and starts sooner; restarts are in-process."""

from __future__ import annotations

from pathlib import Path

from fedvlm.coordinator.server import Coordinator as Daemon

from .harness import Coordinator


class ServedCoordinator(Coordinator):
    """`harness.Coordinator` (init, token, query, count) with the daemon served here instead of in a subprocess."""

    def __init__(self, root: Path, config_toml: str) -> None:
        super().__init__(root, config_toml)
        self.daemon: Daemon | None = None

    def start(self) -> None:
        """Serve; a restart binds the same ports again, as a real restarted daemon would."""
        self.daemon = Daemon(self.fed, self.address or "127.0.0.1:0", self.enroll_address or "127.0.0.1:0")
        bound = self.daemon.start()
        self.address, self.enroll_address = bound.federation, bound.enrollment

    def kill(self, sig: int = 0) -> None:
        """Stop serving (ports closed, state closed); `start()` serves the same directory again."""
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None
