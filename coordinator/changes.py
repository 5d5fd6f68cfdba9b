"""A change counter that sites' long-polls wait on (PollRequest.wait_s): the round driver bumps it after every
transition it makes, so a waiting site hears of a new round or global within milliseconds."""

from __future__ import annotations

import threading


class Changes:
    """A generation number and a condition variable; `notify()` wakes every `wait()`er."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._generation = 0

    def generation(self) -> int:
        """The current generation: read it before computing what a waiter will compare against."""
        with self._condition:
            return self._generation

    def notify(self) -> None:
        """Something a site's assignment depends on may have changed."""
        with self._condition:
            self._generation += 1
            self._condition.notify_all()

    def wait(self, seen: int, timeout: float) -> int:
        """Block until the generation differs from `seen` or `timeout` seconds pass; returns the generation."""
        with self._condition:
            self._condition.wait_for(lambda: self._generation != seen, timeout)
            return self._generation
