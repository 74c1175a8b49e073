"""A host-wide lock serialising cgroup directory creation and removal across orchestrators.

Without it, one VM's cleanup could ``rmdir`` a shared parent cgroup between another VM
creating that parent and creating its own directory inside it. It guards the intermediate
directories and their ledger only: a VM whose parents exist makes and removes its own
directory without it (see :mod:`.creation` and :mod:`.removal` for why that is safe).

The lock file is opened once per process and path and its descriptor kept (opening it
costs a ``mkdir``, an ``open`` and a ``close`` on every use, twice per VM). Keeping one
descriptor changes two things, both handled here:

* ``flock`` on one open file description does not exclude the threads of one process from
  each other, so a ``threading.Lock`` per path serialises them before the ``flock``;
* a forked child (a detached supervisor) shares the parent's open file description and so
  its ``flock``: the child notices the new pid and opens its own (the inherited descriptor
  is closed, never unlocked, so the parent keeps its lock).

A lock file someone deleted (or replaced) would leave us locking an orphan inode, excluding
nobody: after each ``flock`` the path is checked to still name the locked inode.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path
from types import TracebackType

from ...errors import CgroupError

DEFAULT_LOCK_PATH = Path("/run/ironclaw/cgroup.lock")

#: Lock files kept open at once; one not in use is closed to make room (tests use many).
_MAX_OPEN = 8


class _LockFile:
    """One process's descriptor of one lock file, and the mutex its threads share."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mutex = threading.Lock()
        self.fd: int | None = None
        self.ino: tuple[int, int] | None = None
        self.opens = 0

    def open(self) -> int:
        if self.fd is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise CgroupError(
                    f"cannot open the lock file {self.path}: {exc.strerror}; make its "
                    "directory writable (run as root) or pass another lock_path",
                    path=str(self.path),
                ) from exc
            st = os.fstat(fd)
            self.fd, self.ino = fd, (st.st_dev, st.st_ino)
            self.opens += 1
        return self.fd

    def current(self) -> bool:
        """Whether the path still names the inode our descriptor locks."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self.ino

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self.fd, self.ino = None, None


class _Table:
    """This process's lock files by path; rebuilt in a forked child."""

    def __init__(self) -> None:
        self.guard = threading.Lock()
        self.pid = os.getpid()
        self.files: dict[Path, _LockFile] = {}

    def get(self, path: Path) -> _LockFile:
        with self.guard:
            if self.pid != os.getpid():
                # A forked child: the inherited descriptors share the parent's locks. Close
                # them (closing does not unlock while the parent holds its copy) and start over.
                # The mutexes may have been held by threads that do not exist here.
                for entry in self.files.values():
                    entry.close()
                self.files, self.pid = {}, os.getpid()
            found = self.files.get(path)
            if found is not None:
                return found
            if len(self.files) >= _MAX_OPEN:
                self._evict()
            entry = self.files[path] = _LockFile(path)
            return entry

    def _evict(self) -> None:
        for key, entry in list(self.files.items()):
            if entry.mutex.acquire(blocking=False):
                try:
                    entry.close()
                    del self.files[key]
                finally:
                    entry.mutex.release()


_table = _Table()


def _after_fork_in_child() -> None:
    """The parent's threads (and any mutex they held) do not exist in a forked child, and
    its inherited descriptors share the parent's ``flock``s: close them (that does not
    unlock while the parent holds its copy) so a child that outlives a killed parent
    cannot keep the host lock, and start with a fresh table."""
    _table.guard = threading.Lock()
    for entry in _table.files.values():
        entry.close()
    _table.files, _table.pid = {}, os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)


def kept_fds() -> set[int]:
    """Descriptors of the lock files this process keeps open (by design, not per VM)."""
    if _table.pid != os.getpid():
        return set()
    return {e.fd for e in list(_table.files.values()) if e.fd is not None}


def open_count(path: Path) -> int:
    """How often this process opened the lock file ``path`` (for work-count tests)."""
    entry = _table.files.get(path)
    return 0 if entry is None else entry.opens


class HostLock:
    """``with HostLock(path):`` holds an exclusive ``flock`` on ``path`` (created if missing),
    excluding other processes and the other threads of this one. Not reentrant."""

    def __init__(self, path: Path = DEFAULT_LOCK_PATH) -> None:
        self.path = path
        self._entry: _LockFile | None = None

    def __enter__(self) -> HostLock:
        while True:
            entry = _table.get(self.path)
            entry.mutex.acquire()
            if _table.files.get(self.path) is entry:
                break
            entry.mutex.release()  # evicted (or a fork reset) meanwhile: take the current one
        try:
            while True:
                fd = entry.open()
                fcntl.flock(fd, fcntl.LOCK_EX)
                if entry.current():
                    break
                # Deleted or replaced while we did not hold it: lock the file that is there.
                entry.close()
        except BaseException:
            entry.close()  # closing drops a flock taken above
            entry.mutex.release()
            raise
        self._entry = entry
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        entry, self._entry = self._entry, None
        if entry is None:
            return
        try:
            if entry.fd is not None:
                fcntl.flock(entry.fd, fcntl.LOCK_UN)
        finally:
            entry.mutex.release()
