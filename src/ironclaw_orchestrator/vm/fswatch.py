"""Being woken when a path appears (inotify), instead of polling for it.

Readiness waits for the VMM's API socket file. A poll loses up to its interval per start,
and asyncio cannot sleep less than 1 ms (epoll's timeout is in milliseconds), while the
socket appears about 0.1 ms after the jailer exits: an inotify watch on the socket's
directory wakes the event loop when the file is created, no sooner and no later.

One inotify instance serves each event loop of a process for as long as it runs: closing an
instance that held a watch waits for an RCU grace period (about 0.4 ms of wall time here),
while adding and removing a watch costs microseconds. A child process (fork) or another
event loop gets an instance of its own. The loop reads the instance only while someone
waits, so watch removals (``IN_IGNORED``) and unrelated creations in a watched directory
do not wake it otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import struct
import threading
from pathlib import Path

from ..libc import libc

__all__ = ["PathWatch", "kept_fds"]

_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_Q_OVERFLOW = 0x4000
_IN_ONLYDIR = 0x01000000
_MASK = _IN_CREATE | _IN_MOVED_TO | _IN_ONLYDIR
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name


class _Inotify:
    """The process's inotify instance for one event loop; wakes futures by watch."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        fd = libc().inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd = fd
        self.loop = loop
        self.pid = os.getpid()
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}
        #: Users per watch: two waits on one directory share its watch descriptor.
        self._refs: dict[int, int] = {}
        self._reading = False

    def add_watch(self, path: str) -> int:
        wd: int = libc().inotify_add_watch(self.fd, os.fsencode(path), _MASK)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        self._refs[wd] = self._refs.get(wd, 0) + 1
        return wd

    def rm_watch(self, wd: int) -> None:
        refs = self._refs.pop(wd, 1) - 1
        if refs > 0:
            self._refs[wd] = refs
            return
        libc().inotify_rm_watch(self.fd, wd)  # EINVAL if the directory went first: fine

    def wake_on(self, wd: int, fut: asyncio.Future[None]) -> None:
        self._waiters.setdefault(wd, []).append(fut)
        if not self._reading:
            self.loop.add_reader(self.fd, self._read)
            self._reading = True

    def forget(self, wd: int, fut: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(wd)
        if waiters is not None and fut in waiters:
            waiters.remove(fut)
            if not waiters:
                del self._waiters[wd]
        self._stop_reading_if_idle()

    def _stop_reading_if_idle(self) -> None:
        if self._reading and not self._waiters:
            self.loop.remove_reader(self.fd)
            self._reading = False

    def _read(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        woken: set[int] = set()
        overflow = False
        pos = 0
        while pos + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
            pos += _EVENT.size + length
            if mask & _IN_Q_OVERFLOW:
                overflow = True  # events were lost: every waiter looks again
            else:
                woken.add(wd)
        for wd in list(self._waiters) if overflow else woken:
            for fut in self._waiters.pop(wd, ()):
                if not fut.done():
                    fut.set_result(None)
        self._stop_reading_if_idle()


#: One instance per event loop of this process (a program may run loops in several threads).
_instances: dict[asyncio.AbstractEventLoop, _Inotify] = {}
_instances_lock = threading.Lock()


def _inotify() -> _Inotify:
    loop = asyncio.get_running_loop()
    inst = _instances.get(loop)
    if inst is not None and inst.pid == os.getpid():
        return inst
    with _instances_lock:
        for old_loop, old in list(_instances.items()):
            if old_loop.is_closed() or old.pid != os.getpid():
                del _instances[old_loop]  # a closed loop's: nothing reads it any more
                os.close(old.fd)
        inst = _instances[loop] = _Inotify(loop)
    return inst


def kept_fds() -> set[int]:
    """The inotify descriptors this process keeps open (by design, one per event loop)."""
    return {inst.fd for inst in list(_instances.values()) if inst.pid == os.getpid()}


def _after_fork_in_child() -> None:
    """A child never reads the parent's instances (they share the parent's event queue)."""
    global _instances_lock
    _instances_lock = threading.Lock()
    for inst in _instances.values():
        with contextlib.suppress(OSError):
            os.close(inst.fd)
    _instances.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


class PathWatch:
    """Wakes its waiter when ``path`` (or a missing directory above it) is created.

    ``wake_on_change(fut)`` completes ``fut`` on the next creation in the deepest existing
    directory on the way to ``path``; check for ``path`` after it (and once before waiting:
    a file created before the watch was added sends no event). ``False`` from it means no
    watch could be added (e.g. the per-user watch limit): the caller polls instead.
    ``close()`` removes the watch.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._path = os.path.abspath(path)
        self._ino: _Inotify | None = None
        self._wd: int | None = None
        self._dir: str | None = None
        self._fut: asyncio.Future[None] | None = None
        #: Watches added (the directory changed on the way down), for work-count tests.
        self.watches = 0

    def wake_on_change(self, fut: asyncio.Future[None]) -> bool:
        """Complete ``fut`` on the next creation on the way to the path; ``False`` (and
        nothing watched) if no watch could be added: the caller polls instead."""
        self._drop_waiter()
        try:
            ino = self._ino = self._ino or _inotify()
            directory = self._deepest_dir()
            if directory != self._dir:
                self._remove_watch()
                self._wd = ino.add_watch(directory)
                self._dir = directory
                self.watches += 1
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EMFILE, errno.ENOENT, errno.ENOTDIR):
                raise
            self.close()
            return False
        assert self._wd is not None
        ino.wake_on(self._wd, fut)
        self._fut = fut
        return True

    def _deepest_dir(self) -> str:
        parent = os.path.dirname(self._path)  # a string: no Path objects on every start
        while not os.path.isdir(parent):
            parent = os.path.dirname(parent)
        return parent

    def _drop_waiter(self) -> None:
        if self._fut is not None and self._ino is not None and self._wd is not None:
            self._ino.forget(self._wd, self._fut)
        self._fut = None

    def _remove_watch(self) -> None:
        if self._wd is not None and self._ino is not None:
            self._ino.rm_watch(self._wd)
        self._wd, self._dir = None, None

    def close(self) -> None:
        self._drop_waiter()
        self._remove_watch()
