"""Bounds on sites' Upload streams: how many one site may hold open, and how long one may stay silent.

A stream holds one of the server's worker threads for as long as it is open, so without these a single site could
take all of them and starve every other site's Poll (docs/operations.md, "Limits").
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from .errors import Refused

T = TypeVar("T")
_END = object()


class UploadStreams:
    """At most `per_site` open streams per site (`limits.streams_per_site`); a stream that delivers no frame for
    `idle_timeout` seconds (`limits.stream_idle_timeout`) is refused with DEADLINE_EXCEEDED."""

    def __init__(self, per_site: int, idle_timeout: float) -> None:
        self.per_site = per_site
        self.idle_timeout = idle_timeout
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextmanager
    def open(self, site: str) -> Iterator[None]:
        """Count one open stream of `site` while the block runs; RESOURCE_EXHAUSTED, before it runs, past the cap."""
        with self._lock:
            count = self._open.get(site, 0)
            if count >= self.per_site:
                raise Refused("RESOURCE_EXHAUSTED", f"{site!r} already has {count} Upload streams open "
                                                    f"(limits.streams_per_site = {self.per_site})")
            self._open[site] = count + 1
        try:
            yield
        finally:
            with self._lock:
                self._open[site] -= 1
                if not self._open[site]:
                    del self._open[site]

    def frames(self, requests: Iterator[T]) -> Iterator[T]:
        """`requests`, refused with DEADLINE_EXCEEDED once a frame takes longer than the idle timeout to arrive.

        gRPC's synchronous server offers no per-message timeout: a reader thread pulls the stream and hands each
        frame over (at most two ahead), so the handler can wait with a timeout. When the handler returns the call
        ends, which ends the reader's blocked read too.
        """
        handoff: queue.Queue = queue.Queue(maxsize=2)
        done = threading.Event()

        def offer(item: object) -> bool:
            """Hand `item` over unless the handler stopped reading; False then."""
            while not done.is_set():
                try:
                    handoff.put(item, timeout=0.5)
                    return True
                except queue.Full:
                    continue
            return False

        def read() -> None:
            try:
                for item in requests:
                    if not offer(item):
                        return
            except Exception as exc:  # noqa: BLE001 - the call was cancelled or broke: the handler sees it
                offer(exc)
                return
            offer(_END)

        threading.Thread(target=read, daemon=True, name="upload-reader").start()
        try:
            while True:
                try:
                    item = handoff.get(timeout=self.idle_timeout)
                except queue.Empty:
                    raise Refused("DEADLINE_EXCEEDED", f"no upload data for {self.idle_timeout:g}s "
                                                       "(limits.stream_idle_timeout): stream closed") from None
                if item is _END:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            done.set()
