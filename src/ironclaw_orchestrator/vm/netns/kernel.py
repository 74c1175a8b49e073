"""Kernel plumbing: ioctl numbers, libc calls, and running code inside a namespace.

Namespace switching: the TAP ioctls and the namespace-local sysctl are done in a
short-lived helper thread that ``setns()``-es into the namespace and then exits; the
calling thread never leaves its own namespace (:func:`_run_in_netns`). Python 3.12's
``os.setns``/``os.unshare`` are used when present, else libc through ctypes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ...errors import NetworkError
from .names import netns_path

_T = TypeVar("_T")

_CLONE_NEWNET = 0x40000000
# <sys/mount.h>
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_SHARED = 1 << 20
_MNT_DETACH = 0x2
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


def _is_nsfs(path: Path) -> bool:
    """True if ``path`` is a bind-mounted namespace (lives on nsfs), not a plain file."""
    try:
        st = os.stat(path)
        ref = os.stat("/proc/self/ns/net")
    except OSError:
        return False
    return st.st_dev == ref.st_dev


def _require_netns(name: str) -> Path:
    path = netns_path(name)
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


_libc_handle: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _libc_handle
    if _libc_handle is None:
        _libc_handle = ctypes.CDLL(None, use_errno=True)
    return _libc_handle


def _libc_call(func: str, *args: object) -> None:
    """Call ``libc.<func>(*args)``; raise OSError (errno set) if it returns non-zero.

    A libc without that symbol counts as ENOSYS.
    """
    try:
        fn = getattr(_libc(), func)
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
    _libc_call("umount2", os.fsencode(target), _MNT_DETACH)


def _thread_netns_file() -> str:
    """The net namespace file of the calling *thread* (``/proc/self`` is the leader's)."""
    if os.path.exists("/proc/thread-self/ns/net"):  # Linux 3.17+
        return "/proc/thread-self/ns/net"
    return f"/proc/self/task/{threading.get_native_id()}/ns/net"


def _run_in_thread(name: str, func: Callable[[], _T]) -> _T:
    """Run ``func`` in a fresh short-lived thread; return its result or raise its error."""
    results: list[_T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            results.append(func())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"ironclaw-netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


def _run_in_netns(name: str, func: Callable[[], _T]) -> _T:
    """Run ``func`` in a fresh thread that has joined the named network namespace.

    Only the helper thread changes namespace (setns(CLONE_NEWNET) is per thread) and it
    ends when ``func`` returns, so no thread is ever left in a foreign namespace.
    """
    path = _require_netns(name)

    def target() -> _T:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(fd)
        finally:
            os.close(fd)
        return func()

    return _run_in_thread(name, target)
