"""Ctrl-C and SIGTERM during long native calls (engine builds) that swallow Python exceptions.

TensorRT(-RTX) calls back into Python for logging and progress; a
KeyboardInterrupt raised inside such a callback is caught and printed by the
bindings ("Exception caught in log()") and the build runs to the end. So
while a build runs, the signals only *record* the request; the builder's
progress monitor sees it and cancels the build (``step_complete`` returns
False), and the caller raises KeyboardInterrupt once back in Python.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Set by SIGINT/SIGTERM; polled by the builder and checked between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal: int | None = None

    def set(self, signum: int) -> None:
        self.signal = signum
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise KeyboardInterrupt if a stop was requested (call where raising is safe)."""
        if self.is_set():
            raise KeyboardInterrupt(f"signal {self.signal}")


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[StopRequest]:
    """Within the block, SIGINT/SIGTERM set the yielded :class:`StopRequest` instead of raising.

    Outside the main thread signals cannot be handled; the request then never fires and the
    caller's own handling applies. A pending request is raised when the block ends.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        signal.signal(sig, lambda signum, frame: request.set(signum))
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    request.check()
