"""What the executor's threads share: one stop flag, the first failure, and waits that notice it.

Every thread of a run can fail: the reader (a vanished input), a compute worker (a method), the writer
(a full disk). The first failure is recorded and sets the stop flag; every wait in the pipeline polls
that flag at least every POLL_S seconds and then raises `Stopped`, so each thread unwinds within a
second and the run raises that first failure, not a hang and not a secondary error.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

POLL_S = 0.1


class Stopped(Exception):
    """Raised in a thread that finds the run stopping: it unwinds; the failure that stopped the run is
    the one reported."""


class Halt:
    """The run's stop flag and its first failure."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def fail(self, error: BaseException) -> None:
        """Record `error` unless an earlier failure is recorded (a `Stopped` is never one), and stop."""
        if not isinstance(error, Stopped):
            with self._lock:
                if self.error is None:
                    self.error = error
        self.stop.set()

    def check(self) -> None:
        if self.stop.is_set():
            raise Stopped

    def get(self, q: queue.Queue) -> Any:
        """`q.get()`, raising `Stopped` once the run stops."""
        while True:
            self.check()
            try:
                return q.get(timeout=POLL_S)
            except queue.Empty:
                continue

    def put(self, q: queue.Queue, item: object) -> None:
        """`q.put(item)`, raising `Stopped` once the run stops."""
        while True:
            self.check()
            try:
                q.put(item, timeout=POLL_S)
                return
            except queue.Full:
                continue

    def raise_first(self) -> None:
        if self.error is not None:
            raise self.error
