"""Heartbeats accepted but not yet written to state.db: the newest one per site, in memory.

A heartbeat is the most frequent thing a coordinator records (every site, every second) and the least valuable to
keep: it is superseded by the next one. Writing each one as its own transaction put every Poll behind the writer
lock, i.e. behind every fsync'd transition of an upload burst (docs/performance.md, section 6). `State` keeps them
here and writes them in one batch (`State.flush_heartbeats`); its reads of sites overlay what is pending, so this
process never sees an older value than the one it accepted.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass

from .records import Activity, Client


@dataclass(frozen=True)
class Heartbeat:
    """One site's accepted heartbeat. `fingerprint`: the certificate it came with (None: recorded unconditionally),
    checked again when it is written, so a site revoked or re-enrolled meanwhile does not get it."""

    activity: Activity
    detail: str
    bytes_done: int
    bytes_total: int
    last_seen: float
    run_id: str | None
    step: int
    steps_total: int
    fingerprint: str | None

    def applies_to(self, client: Client) -> bool:
        return not client.revoked and self.fingerprint in (None, client.cert_fingerprint)

    def over(self, client: Client) -> Client:
        """`client` as this heartbeat leaves it."""
        if not self.applies_to(client):
            return client
        return dataclasses.replace(client, activity=self.activity, detail=self.detail, bytes_done=self.bytes_done,
                                   bytes_total=self.bytes_total, last_seen=self.last_seen, run_id=self.run_id,
                                   step=self.step, steps_total=self.steps_total)


class PendingHeartbeats:
    """The newest accepted heartbeat of each site not yet written (thread-safe). A batch stays pending until it is
    committed (`written`), so a read in between still sees it."""

    def __init__(self) -> None:
        self._beats: dict[str, Heartbeat] = {}
        self._lock = threading.Lock()

    def put(self, name: str, beat: Heartbeat) -> None:
        with self._lock:
            self._beats[name] = beat

    def __len__(self) -> int:
        return len(self._beats)

    def get(self, name: str) -> Heartbeat | None:
        with self._lock:
            return self._beats.get(name)

    def batch(self) -> dict[str, Heartbeat]:
        """Everything pending now (a copy)."""
        with self._lock:
            return dict(self._beats)

    def written(self, batch: dict[str, Heartbeat]) -> None:
        """`batch` is committed: its heartbeats are no longer pending (a newer one of the same site stays)."""
        with self._lock:
            for name, beat in batch.items():
                if self._beats.get(name) is beat:
                    del self._beats[name]

    def overlay(self, client: Client) -> Client:
        beat = self.get(client.name)
        return beat.over(client) if beat else client
