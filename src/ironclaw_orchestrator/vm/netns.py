"""Network namespaces, TAP devices and the opt-in uplink of a microVM (netlink via pyroute2).

Every VM gets its own network namespace, ``ironclaw-<vm_id>`` (``/run/netns/<name>``, the
same place ``ip netns`` uses), which the jailer joins with ``--netns <path>``. Inside it
lives the VM's TAP device: a *persistent* TAP created here, owned by the jail's uid/gid, so
that the unprivileged, jailed Firecracker can attach to it by name (Firecracker opens
``/dev/net/tun`` itself and calls ``TUNSETIFF`` with ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``,
single queue; the kernel allows that for a non-root caller only if the TAP's owner/group
match it).

By default the namespace has no way out: only ``lo`` and the TAP. Reaching anything
beyond needs the explicit opt-in :func:`ensure_uplink` (a veth pair with one end in the
namespace, a /30 and a default route inside the namespace), undone by
:func:`remove_uplink`. This module never changes the host's firewall or its global
``ip_forward``: NAT and forwarding on the host side are left to the operator (see
:func:`ensure_uplink`).

All functions are synchronous and quick. They use pyroute2's synchronous ``IPRoute``,
which runs its own event loop, so call them from a thread without a running event loop
(e.g. ``await asyncio.to_thread(ensure_netns, name)``), never directly from a coroutine.

Namespace switching: netlink sockets into a namespace are opened by pyroute2
(``IPRoute(netns=...)``). The TAP ioctls and the namespace-local sysctl are done in a
short-lived helper thread that ``setns()``-es into the namespace and then exits; the
calling thread never leaves its own namespace. All errors are :class:`NetworkError`.

Namespace creation (:func:`ensure_netns`) needs no fork and no external binary: a helper
thread ``unshare(CLONE_NEWNET)``-s (only that thread moves), bind-mounts its
``/proc/thread-self/ns/net`` on ``/run/netns/<name>`` exactly like ``ip netns add``, brings
``lo`` up with ``SIOCSIFFLAGS`` on a socket it created (sockets belong to their creator's
namespace) and exits; the bind mount keeps the namespace alive. Only if that fails with
EPERM/ENOSYS (e.g. a seccomp filter) does it fall back to pyroute2, which forks.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import ipaddress
import os
import platform
import re
import signal
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from ..errors import NetworkError

# The id-derived names live in ironclaw_orchestrator.names (one home); re-exported here.
from ..names import NETNS_PREFIX, guest_mac, netns_name, tap_name, uplink_names


def _forget_wakeup_fd() -> None:
    """In a forked child: stop writing signals into the parent's asyncio wakeup fd.

    pyroute2 forks helper processes to reach other namespaces and ends them with SIGTERM. A
    child still running Python would write that 15 into the wakeup fd it inherited, and the
    parent's event loop would run its SIGTERM handler although nobody signalled it.
    """
    with suppress(ValueError):  # not the main thread: nothing inherited to undo
        signal.set_wakeup_fd(-1)


os.register_at_fork(after_in_child=_forget_wakeup_fd)


__all__ = [
    "NETNS_DIR",
    "NETNS_PREFIX",
    "Uplink",
    "ensure_netns",
    "ensure_tap",
    "ensure_uplink",
    "guest_mac",
    "interfaces_in",
    "list_netns",
    "netns_inode",
    "netns_name",
    "netns_path",
    "remove_netns",
    "remove_tap",
    "remove_uplink",
    "tap_name",
    "uplink_names",
]

#: Where named network namespaces are bind-mounted (shared with iproute2's ``ip netns``).
NETNS_DIR = Path("/run/netns")

#: Linux IFNAMSIZ is 16 including the terminating NUL.
IFNAME_MAX = 15

_T = TypeVar("_T")

_NETNS_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,255}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")

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
#: errnos of the fast creation path that make ensure_netns() fall back to pyroute2.
_FALLBACK_ERRNOS = frozenset({errno.EPERM, errno.ENOSYS})
_TUN_DEVICE = "/dev/net/tun"

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


# --------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------


def _check_netns_name(name: str) -> None:
    if not isinstance(name, str) or not _NETNS_NAME_RE.fullmatch(name) or name in (".", ".."):
        raise NetworkError(
            f"invalid network namespace name {name!r}: use 1-255 characters from "
            "[A-Za-z0-9_.-] (not '.' or '..'), e.g. netns_name(vm_id)"
        )


def _check_ifname(name: str, what: str = "interface") -> None:
    if not isinstance(name, str) or not _IFNAME_RE.fullmatch(name) or name in (".", ".."):
        raise NetworkError(
            f"invalid {what} name {name!r}: Linux interface names are 1-{IFNAME_MAX} "
            "characters; use [A-Za-z0-9_.-] only, e.g. tap_name(vm_id)"
        )


def netns_path(name: str) -> Path:
    """Return the bind-mount path of the named network namespace: ``/run/netns/<name>``.

    This is what the jailer's ``--netns`` takes.
    """
    _check_netns_name(name)
    return NETNS_DIR / name



# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


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


def _refuse_running_loop(action: str) -> None:
    """Raise if this thread runs an asyncio loop (pyroute2's sync API needs its own)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise NetworkError(
        f"could not {action}: called from a thread with a running asyncio event loop; "
        "these functions are synchronous (pyroute2 runs its own loop), call them via "
        "asyncio.to_thread() from async code"
    )


@contextmanager
def _ipr(name: str | None) -> Iterator[Any]:
    """Open an rtnetlink socket in the named namespace (``None``: the caller's namespace)."""
    where = "the host namespace" if name is None else f"network namespace {name!r}"
    _refuse_running_loop(f"open a netlink socket in {where}")
    path = None if name is None else _require_netns(name)
    try:
        ipr = IPRoute() if path is None else IPRoute(netns=str(path), flags=0)
    except (OSError, NetlinkError, RuntimeError) as exc:
        raise NetworkError(
            f"could not open a netlink socket in {where}: {exc}; check that it still "
            "exists and that we run as root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
        ) from exc
    try:
        yield ipr
    finally:
        ipr.close()


def _find_link(ipr: Any, ifname: str) -> Any | None:
    """Return the link message for ``ifname``, or None if there is no such link."""
    try:
        links = ipr.link("get", ifname=ifname)
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise
    return links[0] if links else None


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


# --------------------------------------------------------------------------------------
# Namespaces
# --------------------------------------------------------------------------------------


_run_dir_lock = threading.Lock()
_run_dir_ready = False


def _prepare_run_dir() -> None:
    """Make ``/run/netns`` a mount point with shared propagation, like ``ip netns add``.

    iproute2 (``netns_add``): ``mkdir /run/netns``; ``mount --make-rshared /run/netns``; if
    that fails with EINVAL (not a mount point) ``mount --rbind /run/netns /run/netns`` once
    and retry. Shared propagation makes an unmount in one mount namespace reach the others,
    so a removed namespace is really freed. Done once per process (under a lock).
    """
    global _run_dir_ready
    with _run_dir_lock:
        if _run_dir_ready:
            return
        with suppress(FileExistsError):
            os.mkdir(NETNS_DIR, 0o755)
        made_mount_point = False
        while True:
            try:
                _mount("", str(NETNS_DIR), _MS_SHARED | _MS_REC)
                break
            except OSError as exc:
                if exc.errno != errno.EINVAL or made_mount_point:
                    raise
            _mount(str(NETNS_DIR), str(NETNS_DIR), _MS_BIND | _MS_REC)
            made_mount_point = True
        _run_dir_ready = True


def _set_lo_up_here() -> None:
    """Bring ``lo`` up in this thread's network namespace (SIOCGIFFLAGS/SIOCSIFFLAGS).

    The socket is created here, so it belongs to this thread's namespace.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifr = struct.pack("16sH", b"lo", 0).ljust(_IFREQ_SIZE, b"\0")
        (flags,) = struct.unpack_from("H", fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, ifr), 16)
        if not flags & _IFF_UP:
            ifr = struct.pack("16sH", b"lo", flags | _IFF_UP).ljust(_IFREQ_SIZE, b"\0")
            fcntl.ioctl(sock.fileno(), _SIOCSIFFLAGS, ifr)


def _lo_error(name: str, exc: BaseException) -> NetworkError:
    if isinstance(exc, OSError) and exc.errno == errno.ENODEV:
        return NetworkError(
            f"network namespace {name!r} has no 'lo' link: remove it with "
            "remove_netns() and create it again with ensure_netns()"
        )
    return NetworkError(
        f"could not bring 'lo' up in network namespace {name!r}: {exc}; "
        "remove the namespace with remove_netns() and try again"
    )


def _create_here(name: str, path: Path) -> None:
    """Body of the creating thread: new netns for this thread, bind it on ``path``, lo up.

    OSError before the bind mount leaves nothing behind (the file we made is unlinked and
    the namespace dies with the thread); a failure to bring ``lo`` up is a NetworkError
    (the namespace then exists, as with the pyroute2 path).
    """
    _unshare_net()
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))
    try:
        _mount(_thread_netns_file(), str(path), _MS_BIND)
    except BaseException:
        with suppress(OSError):
            os.unlink(path)
        raise
    try:
        _set_lo_up_here()
    except OSError as exc:
        raise _lo_error(name, exc) from exc


def _create_fast(name: str, path: Path) -> bool:
    """Create the namespace without forking. False: not possible here (EPERM/ENOSYS),
    nothing was left behind, use the pyroute2 path. True: it exists now (made by us, with
    ``lo`` up, or concurrently by someone else)."""
    try:
        _prepare_run_dir()
    except OSError as exc:
        if exc.errno in _FALLBACK_ERRNOS:
            return False
        raise NetworkError(
            f"could not make {NETNS_DIR} a shared mount point (as `ip netns add` does) for "
            f"network namespace {name!r}: {exc}; check that we run as root and that "
            f"{NETNS_DIR} is writable"
        ) from exc
    try:
        _run_in_thread(name, lambda: _create_here(name, path))
    except OSError as exc:
        if exc.errno == errno.EEXIST and _is_nsfs(path):
            return True  # someone else created it concurrently: fine
        if exc.errno in _FALLBACK_ERRNOS:
            return False
        raise NetworkError(
            f"could not create network namespace {name!r} at {path}: {exc}; "
            f"check that we run as root and that {NETNS_DIR} is writable"
        ) from exc
    return True


def _create_pyroute2(name: str, path: Path) -> None:
    """Fallback creation through pyroute2 (forks a helper process)."""
    try:
        pr_netns.create(str(path))
    except Exception as exc:
        if not _is_nsfs(path):
            if path.exists():
                _remove_stale(path)
            raise NetworkError(
                f"could not create network namespace {name!r} at {path}: {exc}; "
                f"check that we run as root and that {NETNS_DIR} is writable"
            ) from exc
        # Someone else created it concurrently: fine.


def _lo_up_pyroute2(name: str) -> None:
    try:
        with _ipr(name) as ipr:
            lo = _find_link(ipr, "lo")
            if lo is None:
                raise _lo_error(name, OSError(errno.ENODEV, "no such device"))
            ipr.link("set", index=lo["index"], state="up")
    except NetlinkError as exc:
        raise _lo_error(name, exc) from exc


def _lo_up(name: str) -> None:
    """Bring ``lo`` up in an existing named namespace (setns thread; pyroute2 if refused)."""
    try:
        _run_in_netns(name, _set_lo_up_here)
    except OSError as exc:
        if exc.errno not in _FALLBACK_ERRNOS:
            raise _lo_error(name, exc) from exc
        _lo_up_pyroute2(name)


def ensure_netns(name: str) -> Path:
    """Create the named network namespace if it is missing and bring ``lo`` up in it.

    Idempotent. A stale plain file at ``/run/netns/<name>`` (left by a crash) is replaced.
    Returns the namespace's path (for the jailer's ``--netns``).

    The namespace is made like ``ip netns add`` does (``/run/netns`` a shared mount point,
    the namespace bind-mounted on ``/run/netns/<name>``) but in-process, by a short-lived
    helper thread: no fork, no external binary. If the kernel refuses that with
    EPERM/ENOSYS, pyroute2's forking implementation is used instead.
    """
    path = netns_path(name)
    _refuse_running_loop(f"create network namespace {name!r}")
    if path.exists() and not _is_nsfs(path):
        _remove_stale(path)
    if not path.exists():
        if _create_fast(name, path):
            return path
        _create_pyroute2(name, path)
    _lo_up(name)
    return path


def _remove_stale(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise NetworkError(
            f"could not remove stale namespace file {path}: {exc}; remove it by hand "
            f"(umount {path}; rm {path})"
        ) from exc


def remove_netns(name: str) -> None:
    """Delete the named network namespace if it exists; do nothing if it does not.

    This removes the name (lazily unmounts and unlinks ``/run/netns/<name>``, like ``ip
    netns delete``); the kernel frees the namespace, with every TAP and veth end in it,
    once no process is left inside.
    """
    path = netns_path(name)
    if not os.path.lexists(path):
        return
    if not _is_nsfs(path):
        _remove_stale(path)
        return
    try:
        try:
            _umount_detach(str(path))
        except OSError as exc:
            # EINVAL: no longer a mount point (unmounted concurrently); ENOENT: gone.
            if exc.errno == errno.ENOENT:
                return
            if exc.errno != errno.EINVAL:
                raise
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise NetworkError(
            f"could not remove network namespace {name!r} ({path}): {exc}; check that "
            f"we run as root, then retry or run `ip netns delete {name}`"
        ) from exc


def list_netns(prefix: str = NETNS_PREFIX) -> list[str]:
    """Return the sorted names of the named network namespaces starting with ``prefix``."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise NetworkError(f"could not list {NETNS_DIR}: {exc}; check that we run as root") from exc
    return sorted(n for n in names if n.startswith(prefix))


def netns_inode(path: Path) -> int:
    """Return the inode of a namespace file, comparable with ``/proc/<pid>/ns/net``."""
    try:
        return os.stat(path).st_ino
    except OSError as exc:
        raise NetworkError(
            f"could not stat network namespace file {path}: {exc}; "
            "does the namespace (or the process) still exist?"
        ) from exc


def interfaces_in(netns: str) -> list[str]:
    """Return the names of all links in the named network namespace, by ifindex."""
    try:
        with _ipr(netns) as ipr:
            links = sorted(ipr.link("dump"), key=lambda m: m["index"])
            return [str(m.get("ifname")) for m in links]
    except NetlinkError as exc:
        raise NetworkError(f"could not list links in network namespace {netns!r}: {exc}") from exc


# --------------------------------------------------------------------------------------
# TAP devices
# --------------------------------------------------------------------------------------


def _tun_info(link: Any) -> tuple[str | None, dict[str, Any]]:
    kind = link.get(("linkinfo", "kind"))
    data: dict[str, Any] = {}
    if kind == "tun":
        for key in (
            "IFLA_TUN_TYPE",
            "IFLA_TUN_OWNER",
            "IFLA_TUN_GROUP",
            "IFLA_TUN_MULTI_QUEUE",
            "IFLA_TUN_PERSIST",
        ):
            data[key] = link.get(("linkinfo", "data", key))
    return kind, data


def _create_tap_here(name: str, uid: int, gid: int) -> None:
    """Create (or attach to) the persistent TAP ``name`` in this thread's namespace."""
    fd = os.open(_TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH", name.encode("ascii"), _FIRECRACKER_TAP_FLAGS)
        ifr += b"\0" * (_IFREQ_SIZE - len(ifr))
        fcntl.ioctl(fd, _TUNSETIFF, ifr)
        fcntl.ioctl(fd, _TUNSETOWNER, uid)
        fcntl.ioctl(fd, _TUNSETGROUP, gid)
        fcntl.ioctl(fd, _TUNSETPERSIST, 1)
    finally:
        os.close(fd)


def ensure_tap(netns: str, name: str, uid: int, gid: int, *, host_cidr: str | None = None) -> None:
    """Create a persistent TAP ``name`` inside ``netns`` owned by ``uid``/``gid``; set it up.

    The TAP is single-queue, ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`` (what Firecracker asks
    for) and owned by ``uid``/``gid`` (TUNSETOWNER/TUNSETGROUP) so the jailed VMM running
    as that user can attach to it. It is created inside the namespace only (the ioctls run
    in a helper thread that has joined it). If ``host_cidr`` is given (e.g.
    ``"172.30.0.1/30"``) that address is added to the TAP inside the namespace.

    Idempotent: an existing TAP of that name is kept (its owner/group are corrected if
    they differ, which needs no VMM attached to it); a different kind of link with that
    name is an error.
    """
    _check_ifname(name, "TAP")
    for label, value in (("uid", uid), ("gid", gid)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32 - 1:
            raise NetworkError(
                f"invalid {label} {value!r} for TAP {name!r}: use the jail's numeric "
                f"{label} (0 .. 4294967294)"
            )
    iface = None
    if host_cidr is not None:
        try:
            iface = ipaddress.ip_interface(host_cidr)
        except ValueError as exc:
            raise NetworkError(
                f"invalid host_cidr {host_cidr!r} for TAP {name!r}: {exc}; "
                "give an address with prefix length, e.g. '172.30.0.1/30'"
            ) from exc

    _require_netns(netns)
    try:
        with _ipr(netns) as ipr:
            link = _find_link(ipr, name)
            if link is not None:
                kind, data = _tun_info(link)
                if kind != "tun" or data.get("IFLA_TUN_TYPE") != _TUN_TYPE_TAP:
                    raise NetworkError(
                        f"link {name!r} in network namespace {netns!r} exists but is not "
                        f"a TAP (kind {kind!r}): remove it (remove_tap) or choose another name"
                    )
                if data.get("IFLA_TUN_MULTI_QUEUE"):
                    raise NetworkError(
                        f"TAP {name!r} in network namespace {netns!r} is multi-queue, "
                        "which Firecracker cannot attach to: remove it with remove_tap()"
                    )
                needs_ioctl = (
                    data.get("IFLA_TUN_OWNER") != uid
                    or data.get("IFLA_TUN_GROUP") != gid
                    or not data.get("IFLA_TUN_PERSIST")
                )
            else:
                needs_ioctl = True

            if needs_ioctl:
                try:
                    _run_in_netns(netns, lambda: _create_tap_here(name, uid, gid))
                except OSError as exc:
                    hint = (
                        "a VMM is still attached to it; stop the VM first"
                        if exc.errno == errno.EBUSY
                        else "check that /dev/net/tun exists (modprobe tun) and that we run as root"
                    )
                    raise NetworkError(
                        f"could not create TAP {name!r} owned by {uid}:{gid} in network "
                        f"namespace {netns!r}: {exc}; {hint}"
                    ) from exc

            link = _find_link(ipr, name)
            if link is None:
                raise NetworkError(
                    f"TAP {name!r} did not appear in network namespace {netns!r} after "
                    "creation; check the kernel log (dmesg)"
                )
            _, data = _tun_info(link)
            if data.get("IFLA_TUN_OWNER") != uid or data.get("IFLA_TUN_GROUP") != gid:
                raise NetworkError(
                    f"TAP {name!r} in network namespace {netns!r} is owned by "
                    f"{data.get('IFLA_TUN_OWNER')}:{data.get('IFLA_TUN_GROUP')}, not "
                    f"{uid}:{gid}; remove it with remove_tap() and try again"
                )
            index = link["index"]
            ipr.link("set", index=index, state="up")
            if iface is not None:
                _ensure_address(ipr, index, iface)
    except NetlinkError as exc:
        raise NetworkError(
            f"could not configure TAP {name!r} in network namespace {netns!r}: {exc}"
        ) from exc


def _ensure_address(
    ipr: Any, index: int, iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface
) -> None:
    for msg in ipr.addr("dump", index=index):
        if msg.get("address") == str(iface.ip) and msg["prefixlen"] == iface.network.prefixlen:
            return
    try:
        ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise


def remove_tap(netns: str, name: str) -> None:
    """Delete TAP ``name`` from ``netns``; do nothing if the TAP or the namespace is gone."""
    _check_ifname(name, "TAP")
    path = netns_path(netns)
    if not _is_nsfs(path):
        return
    try:
        with _ipr(netns) as ipr:
            link = _find_link(ipr, name)
            if link is None:
                return
            kind, data = _tun_info(link)
            if kind != "tun" or data.get("IFLA_TUN_TYPE") != _TUN_TYPE_TAP:
                raise NetworkError(
                    f"refusing to delete link {name!r} in network namespace {netns!r}: it "
                    f"is not a TAP (kind {kind!r}); check the name"
                )
            try:
                ipr.link("del", index=link["index"])
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise
    except NetlinkError as exc:
        raise NetworkError(
            f"could not delete TAP {name!r} in network namespace {netns!r}: {exc}"
        ) from exc


# --------------------------------------------------------------------------------------
# Opt-in uplink (veth pair)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Uplink:
    """The veth uplink of a VM's namespace, as created by :func:`ensure_uplink`."""

    netns: str
    host_ifname: str
    netns_ifname: str
    host_address: ipaddress.IPv4Interface
    netns_address: ipaddress.IPv4Interface


def _parse_subnet(subnet: str | ipaddress.IPv4Network, vm_id: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(subnet, strict=True)
    except (ValueError, TypeError) as exc:
        raise NetworkError(
            f"invalid uplink subnet {subnet!r} for VM {vm_id!r}: {exc}; give an IPv4 /30 "
            "network such as '172.31.0.0/30'"
        ) from exc
    if not isinstance(net, ipaddress.IPv4Network) or net.prefixlen != 30:
        raise NetworkError(
            f"invalid uplink subnet {subnet!r} for VM {vm_id!r}: it must be an IPv4 /30 "
            "network such as '172.31.0.0/30'"
        )
    return net


def _write_ns_sysctl(key: str, value: str) -> None:
    with open(f"/proc/sys/{key.replace('.', '/')}", "w", encoding="ascii") as fh:
        fh.write(value)


def ensure_uplink(
    netns: str,
    vm_id: str,
    subnet: str | ipaddress.IPv4Network,
    *,
    forward_in_netns: bool = True,
) -> Uplink:
    """Opt-in outbound path: connect ``netns`` to the host with a veth pair. Idempotent.

    Creates ``icv<hash>`` on the host and ``icu<hash>`` inside the namespace (see
    :func:`uplink_names`), gives the host end the first and the namespace end the second
    address of the IPv4 /30 ``subnet``, brings both up and installs a default route inside
    the namespace via the host end. With ``forward_in_netns`` (default) IPv4 forwarding is
    enabled *inside the namespace only* (``net.ipv4.ip_forward`` is per namespace), so
    guest traffic arriving on the TAP can leave through the uplink.

    Not done here, on purpose (this module never shells out and never touches the host's
    firewall or its global ``ip_forward``): NAT/masquerading and forwarding on the host.
    To let the guest reach further, the operator must, on the host, route the guest's
    subnet via the namespace end, enable forwarding, and masquerade it in an nftables
    table of their own.

    Remove with :func:`remove_uplink` (at VM stop).
    """
    net = _parse_subnet(subnet, vm_id)
    host_if, ns_if = uplink_names(vm_id)
    host_ip, ns_ip = net[1], net[2]
    host_addr = ipaddress.IPv4Interface(f"{host_ip}/{net.prefixlen}")
    ns_addr = ipaddress.IPv4Interface(f"{ns_ip}/{net.prefixlen}")
    path = _require_netns(netns)

    try:
        with _ipr(None) as host, _ipr(netns) as inner:
            # Refuse a subnet already used by another host interface.
            for msg in host.addr("dump", family=2):
                addr = msg.get("address")
                if addr is None or ipaddress.ip_address(addr) not in net:
                    continue
                owner = host.link("get", index=msg["index"])[0].get("ifname")
                if owner != host_if:
                    raise NetworkError(
                        f"uplink subnet {net} for VM {vm_id!r} overlaps address {addr} of "
                        f"host interface {owner!r}: choose a free /30"
                    )

            host_link = _find_link(host, host_if)
            ns_link = _find_link(inner, ns_if)
            if host_link is not None:
                kind = host_link.get(("linkinfo", "kind"))
                if kind != "veth":
                    raise NetworkError(
                        f"host link {host_if!r} (uplink of VM {vm_id!r}) exists but is not "
                        f"a veth (kind {kind!r}): remove it by hand (ip link del {host_if})"
                    )
                if ns_link is None:
                    # Half a pair (peer elsewhere): start over.
                    host.link("del", index=host_link["index"])
                    host_link = None
            if host_link is None:
                if ns_link is not None:
                    inner.link("del", index=ns_link["index"])
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    host.link(
                        "add",
                        ifname=host_if,
                        kind="veth",
                        peer={"ifname": ns_if, "net_ns_fd": fd},
                    )
                finally:
                    os.close(fd)
                host_link = _find_link(host, host_if)
                ns_link = _find_link(inner, ns_if)
                if host_link is None or ns_link is None:
                    raise NetworkError(
                        f"veth pair {host_if}/{ns_if} for VM {vm_id!r} did not appear "
                        f"after creation (host: {host_link is not None}, netns "
                        f"{netns!r}: {ns_link is not None}); check the kernel log"
                    )

            if host_link is None or ns_link is None:  # for the type checker
                raise NetworkError(f"veth pair {host_if}/{ns_if} for VM {vm_id!r} is missing")
            host_index: int = host_link["index"]
            ns_index: int = ns_link["index"]
            _ensure_address(host, host_index, host_addr)
            host.link("set", index=host_index, state="up")
            _ensure_address(inner, ns_index, ns_addr)
            inner.link("set", index=ns_index, state="up")
            inner.route("replace", dst="0.0.0.0/0", gateway=str(host_ip), oif=ns_index)
    except NetlinkError as exc:
        raise NetworkError(
            f"could not set up uplink {host_if}/{ns_if} ({net}) for VM {vm_id!r} and "
            f"network namespace {netns!r}: {exc}; remove it with remove_uplink() and retry"
        ) from exc

    if forward_in_netns:
        try:
            _run_in_netns(netns, lambda: _write_ns_sysctl("net.ipv4.ip_forward", "1"))
        except OSError as exc:
            raise NetworkError(
                f"could not enable IPv4 forwarding inside network namespace {netns!r}: "
                f"{exc}; check that /proc/sys is writable (we must run as root)"
            ) from exc

    return Uplink(
        netns=netns,
        host_ifname=host_if,
        netns_ifname=ns_if,
        host_address=host_addr,
        netns_address=ns_addr,
    )


def remove_uplink(netns: str, vm_id: str) -> None:
    """Remove the veth uplink of VM ``vm_id``; do nothing if it is already gone.

    Deleting the host end deletes its peer in the namespace (and the route through it).
    """
    host_if, ns_if = uplink_names(vm_id)
    try:
        with _ipr(None) as host:
            link = _find_link(host, host_if)
            if link is not None:
                kind = link.get(("linkinfo", "kind"))
                if kind != "veth":
                    raise NetworkError(
                        f"refusing to delete host link {host_if!r}: it is not a veth "
                        f"(kind {kind!r}); it was not created by ensure_uplink()"
                    )
                try:
                    host.link("del", index=link["index"])
                except NetlinkError as exc:
                    if exc.code != errno.ENODEV:
                        raise
        if _is_nsfs(netns_path(netns)):
            with _ipr(netns) as inner:
                link = _find_link(inner, ns_if)
                if link is not None and link.get(("linkinfo", "kind")) == "veth":
                    try:
                        inner.link("del", index=link["index"])
                    except NetlinkError as exc:
                        if exc.code != errno.ENODEV:
                            raise
    except NetlinkError as exc:
        raise NetworkError(
            f"could not delete uplink {host_if}/{ns_if} of VM {vm_id!r}: {exc}; "
            f"delete it by hand (ip link del {host_if})"
        ) from exc
