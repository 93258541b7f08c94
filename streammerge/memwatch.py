"""A background sampler of this process's resident memory, for the run report's memory-over-time chart.

The report's peak RSS is one number (the OS's high-water mark); a chart needs the curve, so a daemon
thread reads RSS every ``interval`` seconds on the same clock (``time.perf_counter``) as the shards'
start and finish times. Sampling costs one /proc read per tick and holds the GIL for microseconds.
"""

from __future__ import annotations

import threading
import time

__all__ = ["MemWatch"]


class MemWatch:
    """``with MemWatch() as w: ...``, then ``w.samples``: (perf_counter seconds, RSS bytes) pairs, the
    first taken on entry and the last on exit, so even a short run has two points."""

    def __init__(self, interval: float = 0.05) -> None:
        if interval <= 0:
            raise ValueError(f"MemWatch interval: expected seconds > 0, got {interval}")
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.started = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _rss(self) -> int:
        import psutil

        return psutil.Process().memory_info().rss

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append((time.perf_counter(), self._rss()))

    def __enter__(self) -> "MemWatch":
        self.started = time.perf_counter()
        self.samples.append((self.started, self._rss()))
        self._thread = threading.Thread(target=self._loop, name="streammerge-memwatch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.samples.append((time.perf_counter(), self._rss()))

    @property
    def peak(self) -> int:
        return max((rss for _, rss in self.samples), default=0)
