"""The C library, loaded once per process, with ``errno`` kept (``ctypes.get_errno()``).

For the few system calls Python's ``os`` module lacks (``openat2``, ``renameat2``, ``unshare``,
``setns``, ``mount``, ``inotify``, ``prctl``); each caller turns a failure into ``OSError``.
"""

from __future__ import annotations

import ctypes
import functools

__all__ = ["libc"]


@functools.cache
def libc() -> ctypes.CDLL:
    """The process's C library (``dlopen(NULL)``), with ``use_errno``."""
    return ctypes.CDLL(None, use_errno=True)
