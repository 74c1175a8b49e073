"""Kernel plumbing: ioctl numbers, libc calls, and running code inside a namespace.

Namespace switching: namespace creation, the TAP ioctls and the namespace-local sysctl are
done in a helper thread that enters the namespace (``unshare``/``setns``) for one job and
then returns home, or ends if it cannot; the calling thread never leaves its own namespace
(:func:`_run_in_netns`, :func:`_run_in_new_netns`). Idle helpers are kept for reuse. Python 3.12's
``os.setns``/``os.unshare`` are used when present, else libc through ctypes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import queue
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from ...errors import NetworkError
from ...libc import libc
from .names import netns_path

_T = TypeVar("_T")

_CLONE_NEWNET = 0x40000000
# <sys/mount.h>
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_SHARED = 1 << 20
_MNT_DETACH = 0x2
_UMOUNT_NOFOLLOW = 0x8
# <linux/sockios.h>, <net/if.h> (same numbers on every Linux architecture)
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
#: The TUN/TAP clone device (a TAP is made, and Firecracker attaches to it, through it).
TUN_DEVICE = Path("/dev/net/tun")
_TUN_DEVICE = str(TUN_DEVICE)

# <linux/if_tun.h>
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
#: Exactly what Firecracker (v1.0 .. v1.14) passes to TUNSETIFF when it opens the TAP.
_FIRECRACKER_TAP_FLAGS = _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR
#: IFLA_TUN_TYPE value of a TAP (IFF_TAP).
_TUN_TYPE_TAP = 2
#: sizeof(struct ifreq) on Linux.
_IFREQ_SIZE = 40


def _iow_int(nr: int) -> int:
    """Return the ``_IOW('T', nr, int)`` ioctl number for this machine's ABI."""
    machine = platform.machine().lower()
    # x86, arm, s390, riscv...: _IOC_WRITE is bit 30; powerpc, mips, sparc, alpha: bit 31.
    alt_abi = machine.startswith(("ppc", "powerpc", "mips", "sparc", "alpha"))
    write = 0x80000000 if alt_abi else 0x40000000
    return write | (struct.calcsize("i") << 16) | (ord("T") << 8) | nr


_TUNSETIFF = _iow_int(202)
_TUNSETPERSIST = _iow_int(203)
_TUNSETOWNER = _iow_int(204)
_TUNSETGROUP = _iow_int(206)


_nsfs_dev: int | None = None


def _is_nsfs(path: Path | str) -> bool:
    """True if ``path`` is a bind-mounted namespace (lives on nsfs), not a plain file."""
    global _nsfs_dev
    try:
        st = os.stat(path)
        if _nsfs_dev is None:  # one nsfs per kernel: stat it once per process
            _nsfs_dev = os.stat("/proc/self/ns/net").st_dev
    except OSError:
        return False
    return st.st_dev == _nsfs_dev


def _require_netns(name: str) -> Path:
    """The namespace's path: ``name`` under ``/run/netns``, or ``name`` itself if it is an
    absolute path (such as a nameless VM namespace's ``/proc/<pid>/ns/net``)."""
    path = Path(name) if name.startswith("/") else netns_path(name)
    if not path.exists():
        raise NetworkError(
            f"network namespace {name!r} does not exist ({path} is missing): "
            "create it first with ensure_netns()"
        )
    if not _is_nsfs(path):
        raise NetworkError(
            f"{path} exists but is not a mounted network namespace (stale leftover?): "
            "remove it with remove_netns() and create it again with ensure_netns()"
        )
    return path


def _libc_call(func: str, *args: object) -> None:
    """Call ``libc.<func>(*args)``; raise OSError (errno set) if it returns non-zero.

    A libc without that symbol counts as ENOSYS.
    """
    try:
        fn = getattr(libc(), func)
    except AttributeError as exc:
        raise OSError(errno.ENOSYS, f"libc has no {func}()") from exc
    if fn(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{func}(): {os.strerror(err)}")


def _setns(fd: int) -> None:
    setns = getattr(os, "setns", None)  # Python 3.12+
    if setns is not None:
        setns(fd, _CLONE_NEWNET)
        return
    _libc_call("setns", fd, _CLONE_NEWNET)


def _unshare_net() -> None:
    unshare = getattr(os, "unshare", None)  # Python 3.12+
    if unshare is not None:
        unshare(_CLONE_NEWNET)
        return
    _libc_call("unshare", _CLONE_NEWNET)


def _mount(source: str, target: str, flags: int) -> None:
    _libc_call("mount", os.fsencode(source), os.fsencode(target), b"none", flags, None)


def _umount_detach(target: str) -> None:
    """Lazily unmount ``target``; a symlink there is not followed (EINVAL: not a mount)."""
    _libc_call("umount2", os.fsencode(target), _MNT_DETACH | _UMOUNT_NOFOLLOW)


_HAVE_THREAD_SELF: bool | None = None


def _thread_netns_file() -> str:
    """The net namespace file of the calling *thread* (``/proc/self`` is the leader's)."""
    global _HAVE_THREAD_SELF
    if _HAVE_THREAD_SELF is None:
        _HAVE_THREAD_SELF = os.path.exists("/proc/thread-self/ns/net")  # Linux 3.17+
    if _HAVE_THREAD_SELF:
        return "/proc/thread-self/ns/net"
    return f"/proc/self/task/{threading.get_native_id()}/ns/net"


#: Idle helper threads kept for the next namespace job (more run at once if asked): as
#: many as asyncio's default executor runs at once on a small host.
_MAX_IDLE_WORKERS = 8


def _is_process_netns(fd: int) -> bool:
    """Whether ``fd`` is the process's own network namespace (its main thread's)."""
    home, main = os.fstat(fd), os.stat("/proc/self/ns/net")
    return (home.st_dev, home.st_ino) == (main.st_dev, main.st_ino)


class _NetnsWorker:
    """A helper thread that runs each job inside a network namespace it enters for that job.

    After every job it returns to its home namespace (``setns`` to the one it started in);
    if that fails it ends, namespace and all. So no thread stays in a foreign namespace and
    no later job runs where an earlier one left it. Reusing it saves starting a thread per
    namespace (a clone and Python's thread bootstrap: about twice the cost of a hand-off).
    """

    def __init__(self) -> None:
        # Opened by the creating thread: the new thread starts in the same namespace.
        self._home = os.open(_thread_netns_file(), os.O_RDONLY | os.O_CLOEXEC)
        # Made by a thread outside the process's own namespace (a caller's, or a job's):
        # used once, never pooled, so no idle thread keeps a foreign namespace alive.
        self.poolable = _is_process_netns(self._home)
        self._jobs: queue.SimpleQueue[tuple[Callable[[], None], Callable[[], Any]] | None]
        self._jobs = queue.SimpleQueue()
        self._results: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
        self.usable = True
        self.thread = threading.Thread(target=self._loop, name="ironclaw-netns", daemon=True)
        try:
            self.thread.start()
        except BaseException:
            os.close(self._home)
            raise

    def _loop(self) -> None:
        try:
            while (job := self._jobs.get()) is not None:
                enter, func = job
                try:
                    enter()
                    out: tuple[bool, Any] = (True, func())
                except BaseException as exc:
                    out = (False, exc)
                try:
                    _setns(self._home)  # also after a failed enter(): cheap, and certain
                except BaseException:
                    self.usable = False  # stranded: end the thread (and leave the namespace)
                self._results.put(out)
                if not self.usable:
                    return
        finally:
            os.close(self._home)

    def run(self, enter: Callable[[], None], func: Callable[[], _T]) -> _T:
        self._jobs.put((enter, func))
        try:
            ok, value = self._results.get()
        except BaseException:  # interrupted while the job runs: never reuse this worker
            self.usable = False
            self._jobs.put(None)
            raise
        if not ok:
            raise value
        return cast(_T, value)

    def close(self) -> None:
        self._jobs.put(None)


class _NetnsWorkers:
    """The process's idle :class:`_NetnsWorker` threads (none are shared across a fork)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_NetnsWorker] = []
        #: Workers started so far (a work count for tests).
        self.started = 0

    def run(self, enter: Callable[[], None], func: Callable[[], _T]) -> _T:
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is None:
            worker = _NetnsWorker()
            with self._lock:
                self.started += 1
        try:
            return worker.run(enter, func)
        finally:
            self._put_back(worker)

    def _put_back(self, worker: _NetnsWorker) -> None:
        if worker.usable and worker.poolable:
            with self._lock:
                if len(self._idle) < _MAX_IDLE_WORKERS:
                    self._idle.append(worker)
                    return
        worker.close()

    def close_idle(self, timeout_s: float = 10.0) -> None:
        """End the idle workers (and wait for them); later jobs start new ones."""
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.close()
        for worker in idle:
            worker.thread.join(timeout_s)

    def _after_fork_in_child(self) -> None:
        # The threads did not survive the fork: forget them (their fds are closed on exec).
        self._lock = threading.Lock()
        self._idle = []


_WORKERS = _NetnsWorkers()
os.register_at_fork(after_in_child=lambda: _WORKERS._after_fork_in_child())


def close_idle_workers() -> None:
    """End the idle namespace helper threads (they are kept, at most
    ``_MAX_IDLE_WORKERS``, for the life of the process otherwise)."""
    _WORKERS.close_idle()


def _run_in_new_netns(enter: Callable[[], None], func: Callable[[], _T]) -> _T:
    """Run ``func`` in a helper thread after ``enter()`` moved it (``_unshare_net``)."""
    return _WORKERS.run(enter, func)


def _run_in_netns(name: str, func: Callable[[], _T]) -> _T:
    """Run ``func`` in a helper thread that has joined the named network namespace.

    Only the helper thread changes namespace (setns(CLONE_NEWNET) is per thread) and it
    goes home (or ends) when ``func`` returns, so no thread is left in a foreign namespace.
    """
    path = _require_netns(name)

    def enter() -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(fd)
        finally:
            os.close(fd)

    return _WORKERS.run(enter, func)
