"""SIGINT, SIGTERM and SIGHUP as KeyboardInterrupt in the main thread, for the length of a command."""

from __future__ import annotations

import contextlib
import signal
import threading

from ..pipeline import interrupt


class _Stopped(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP, raised in the main thread so that every one stops a run the way Ctrl-C
    does: the writer finishes the bands in flight, unfinished shards stay `.partial`, `--resume` continues."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, frame) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once (still resumable)
    stopped = _Stopped(signum)
    interrupt(stopped)   # the run's threads stop on it even if this raise is lost
    raise stopped


@contextlib.contextmanager
def signals_as_interrupt():
    """Handlers only from the main thread (signal.signal refuses others), and only over Python's own
    defaults (a SIGHUP ignored under nohup stays ignored); restored on the way out, so `main()` called
    from a library or a test leaves the process as it found it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL, signal.SIGHUP: signal.SIG_DFL}
    previous = {sig: signal.signal(sig, _raise_stopped) for sig, default in defaults.items()
                if signal.getsignal(sig) is default}
    interrupt(None)
    try:
        yield
    finally:
        interrupt(None)
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
