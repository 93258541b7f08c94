"""What the executor's threads share: one stop flag, the first failure, waits that notice it, fixed
buffer pools and a bounded heap.

Every thread of a run can fail: the reader (a vanished input), a compute worker (a method), the writer
(a full disk). The first failure is recorded and sets the stop flag; every wait in the pipeline polls
that flag at least every POLL_S seconds and then raises `Stopped`, so each thread unwinds within a
second and the run raises that first failure, not a hang and not a secondary error.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
from typing import Any

POLL_S = 0.1
DONE = object()   # the last item of a pipeline queue


class Stopped(Exception):
    """Raised in a thread that finds the run stopping: it unwinds; the failure that stopped the run is
    the one reported."""


_interrupted: list[BaseException] = []   # a signal's interrupt, seen by every Halt (see `interrupt`)


def interrupt(error: BaseException | None) -> None:
    """Record the KeyboardInterrupt a signal raised in the main thread (None clears it). The main thread
    can lose that exception (raised inside a finalizer that the garbage collector runs there, it is
    only printed), so every run's threads also poll this record and stop the run with it."""
    _interrupted[:] = [] if error is None else [error]


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
        if _interrupted and not self.stop.is_set():
            self.fail(_interrupted[0])
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


class Pool:
    """Fixed slots of raw bytes; a band borrows one slot for all of its inputs."""

    def __init__(self, slots: int, slot_bytes: int, pin: bool = False):
        import torch

        self.buffers = [torch.empty(max(slot_bytes, 1), dtype=torch.uint8, pin_memory=pin) for _ in range(slots)]
        self.free: queue.Queue[int] = queue.Queue()
        for i in range(slots):
            self.free.put(i)


@functools.lru_cache(maxsize=None)
def _libc() -> Any:
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def trim_heap(above: int = 0) -> None:
    """Return the free pages inside glibc's heaps to the OS (``malloc_trim(0)``) when the process's
    resident memory is over ``above`` bytes; the compute loop calls it once per band. A freed sub-MiB
    block pinned in place by a live small one stays resident until trimmed; that is how a per-block
    temporary once grew the heap past the budget (see ``kernels.della.della_keep``), and this keeps
    such a leak from reaching resident memory. Below ``above`` the pages stay: every trimmed page
    faults again when the next band's temporaries reuse it (arcee_fusion took 1.6 million faults,
    10 s of system time per 1.1B-parameter merge, trimming after every band)."""
    if above and resident_bytes() <= above:
        return
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def resident_bytes() -> int:
    """This process's resident set now (/proc/self/statm, a few microseconds); 0 where unknown."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def bound_malloc() -> None:
    """glibc gives each thread its own heap arena and keeps freed mid-size blocks there; with several
    compute threads making block-sized temporaries, resident memory crept to twice the budget. Fewer
    arenas and a fixed mmap threshold (large blocks go back to the OS on free) keep it bounded.
    Process-wide: called once at the start of a run (`merge.run`), not per executor."""
    libc = _libc()
    try:
        libc.mallopt(-8, 2)          # M_ARENA_MAX
        libc.mallopt(-3, 1 << 20)    # M_MMAP_THRESHOLD: fixed, so no longer raised dynamically
        libc.mallopt(-1, 4 << 20)    # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass
