"""Ctrl-C during a build must leave the previous artifact untouched, every time.

Python turns SIGINT into ``KeyboardInterrupt`` at the next bytecode boundary, but a signal that
lands while native code runs (``tvm.compile``, the linker, a torch kernel) can be consumed there:
TVM's FFI checks signals itself and reports them as its own error, which a handler that wraps
compiler errors may then treat as an ordinary failure, or a callback may swallow them. The
guard remembers that a signal came, whatever happened to the exception, and the build checks it
between stages and right before the staged directory replaces the old artifact.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

PAUSE_ENV = "LPRNET_EDGE_PAUSE_BEFORE_STAGE"


class InterruptGuard:
    """Records SIGINT/SIGTERM while installed; :meth:`check` raises if one came."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.signal = signum
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt

    @contextmanager
    def installed(self) -> Iterator[InterruptGuard]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals are only delivered to the main thread: nothing to guard
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handler)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


def pause_for_tests(stage: str) -> None:
    """Fault injection for the interruption tests: ``LPRNET_EDGE_PAUSE_BEFORE_STAGE=name:secs``
    sleeps once stage ``name`` is announced and before its work, so a signal can be sent at a
    known point (even for a stage that lasts milliseconds, like ``package``)."""
    value = os.environ.get(PAUSE_ENV, "")
    name, _, secs = value.partition(":")
    if name == stage:
        time.sleep(float(secs or 1))
