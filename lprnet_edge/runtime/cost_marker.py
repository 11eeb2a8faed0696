"""Marks the region of a program that the cost instrument measures.

The instrument runs a whole process (Python start-up, imports, model loading, inference)
under qemu with a counting plugin; only the inferences are the figure. The guest program
brackets them with :func:`measured_region`, which issues ``getppid`` with a magic first
argument: a no-op on any real CPU, and a mark the plugin sees in its syscall callback. The
plugin snapshots its block counters at the start mark and subtracts them at the stop mark,
so what runs outside the region (and the marks themselves) is not counted.

Only ctypes: this module ships to the board with the rest of ``runtime/``.
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Iterator
from contextlib import contextmanager

MAGIC = 0x4C50524E  # "LPRN": the first syscall argument the plugin looks for
START, STOP, DUMP = 1, 2, 3  # the second argument (DUMP: the third is the section id)
# getppid takes no arguments, so the kernel ignores the ones we pass: harmless everywhere.
GETPPID = {"aarch64": 173, "arm64": 173, "x86_64": 110, "amd64": 110}

_libc = ctypes.CDLL(None, use_errno=True)


def mark(code: int, arg: int = 0) -> None:
    """Issue the marker syscall (``START``, ``STOP`` or ``DUMP``); a no-op on an unknown
    machine."""
    nr = GETPPID.get(platform.machine().lower())
    if nr is not None:
        _libc.syscall(ctypes.c_long(nr), ctypes.c_long(MAGIC), ctypes.c_long(code),
                      ctypes.c_long(arg))


def dump_region(section: int) -> None:
    """Have the plugin write what the regions since the last dump counted as section
    ``section`` and start afresh: one process then measures many programs separately."""
    mark(DUMP, section)


@contextmanager
def measured_region() -> Iterator[None]:
    """Count what runs inside the ``with`` block (and nothing else) under the instrument."""
    mark(START)
    try:
        yield
    finally:
        mark(STOP)
