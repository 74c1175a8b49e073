"""Named network namespaces: create, remove, list, inspect.

Namespace creation needs no fork and no external binary: a helper thread
``unshare(CLONE_NEWNET)``-s (only that thread moves), bind-mounts its
``/proc/thread-self/ns/net`` on ``/run/netns/<name>`` exactly like ``ip netns add``, and (for
:func:`ensure_netns`) brings ``lo`` up with ``SIOCSIFFLAGS`` on a socket it created (sockets
belong to their creator's namespace) and goes back home; the bind mount keeps the namespace
alive.

A VM's own namespace (:func:`create_vm_netns`, or :func:`create_claimed_netns` for a VM
with a TAP or uplink, which are set up by name) keeps ``lo`` down, as ``ip netns add``
leaves it and as the spec's example uses it: only the jailer and Firecracker run inside and
neither uses IP there (the API and vsock are Unix sockets; the guest's packets arrive on its
TAP, and packets to the namespace's own TAP or veth addresses are delivered without ``lo``).
Only a program in the namespace talking to the namespace itself would need it. Bringing it
up cost ~15% of the namespace's creation (a socket, two ioctls, IPv6 and route setup) and
more kernel work again when the namespace is freed.

Two ways in: :func:`ensure_netns` (idempotent; if the kernel refuses with EPERM/ENOSYS it
falls back to pyroute2, which forks), and for a VM :func:`claim_netns_name` then
:func:`create_claimed_netns`: the empty file made exclusively at ``/run/netns/<name>`` (as
``ip netns add`` makes it) is the claim of the name, recorded before the namespace is bound
on it; no lock is needed (see :func:`ironclaw_orchestrator.vm.cleanup.claim_netns`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from ...errors import NetworkError
from .kernel import (
    _IFF_UP,
    _IFREQ_SIZE,
    _MS_BIND,
    _MS_REC,
    _MS_SHARED,
    _SIOCGIFFLAGS,
    _SIOCSIFFLAGS,
    _is_nsfs,
    _mount,
    _run_in_netns,
    _run_in_new_netns,
    _thread_netns_file,
    _umount_detach,
    _unshare_net,
)
from .names import NETNS_DIR, NETNS_PREFIX, netns_path
from .netlink import _find_link, _ipr, _refuse_running_loop
from .pool import new_probe

#: errnos of the fast creation path that make ensure_netns() fall back to pyroute2.
_FALLBACK_ERRNOS = frozenset({errno.EPERM, errno.ENOSYS})


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
    if _run_dir_ready:  # the common case: no lock taken
        return
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


def _bind_here(name: str, path: Path, lo_up: bool = True) -> None:
    """In the helper thread, after its unshare: bind its namespace on ``path``, ``lo`` up."""
    _mount(_thread_netns_file(), str(path), _MS_BIND)
    if not lo_up:
        return
    try:
        _set_lo_up_here()
    except OSError as exc:
        raise _lo_error(name, exc) from exc


def _create_here(name: str, path: Path) -> None:
    """Body of the helper thread (after its unshare): make ``path``, bind on it, lo up.

    OSError before the bind mount leaves nothing behind (the file we made is unlinked and
    the namespace dies when the thread goes home); a failure to bring ``lo`` up is a
    NetworkError (the namespace then exists, as with the pyroute2 path).
    """
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))
    try:
        _bind_here(name, path)
    except OSError:
        with suppress(OSError):
            os.unlink(path)
        raise


def _run_dir_error(name: str, exc: OSError) -> NetworkError:
    return NetworkError(
        f"could not make {NETNS_DIR} a shared mount point (as `ip netns add` does) for "
        f"network namespace {name!r}: {exc}; check that we run as root and that "
        f"{NETNS_DIR} is writable"
    )


def _create_fast(name: str, path: Path) -> bool:
    """Create the namespace without forking. False: not possible here (EPERM/ENOSYS),
    nothing was left behind, use the pyroute2 path. True: it exists now (made by us, with
    ``lo`` up, or concurrently by someone else)."""
    try:
        _prepare_run_dir()
    except OSError as exc:
        if exc.errno in _FALLBACK_ERRNOS:
            return False
        raise _run_dir_error(name, exc) from exc
    try:
        _run_in_new_netns(_unshare_net, lambda: _create_here(name, path))
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
    from pyroute2 import netns as pr_netns

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
    from pyroute2.netlink.exceptions import NetlinkError

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
    if not _is_nsfs(path):
        if os.path.lexists(path):
            _remove_stale(path)
        if _create_fast(name, path):
            return path
        _create_pyroute2(name, path)
    _lo_up(name)
    return path


def claim_netns_name(name: str) -> Path:
    """Claim ``/run/netns/<name>``: create it, empty, exclusively (``ip netns add``'s first step).

    Raises ``FileExistsError`` if the name is taken (a namespace, someone's claim, a stale
    file), and then nothing was made. Afterwards the name is the caller's alone: record it,
    then bind the namespace with :func:`create_claimed_netns`. :func:`remove_netns` removes
    a claim that was never bound.
    """
    path = netns_path(name)
    try:
        _prepare_run_dir()
    except OSError as exc:
        raise _run_dir_error(name, exc) from exc
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))
    except FileExistsError:
        raise
    except OSError as exc:
        raise NetworkError(
            f"could not claim network namespace {name!r} ({path}): {exc}; check that we "
            f"run as root and that {NETNS_DIR} is writable"
        ) from exc
    return path


def create_claimed_netns(name: str) -> Path:
    """Make the network namespace on the file :func:`claim_netns_name` made; ``lo`` stays
    down, as ``ip netns add`` leaves it (see the module docstring; :func:`ensure_netns`
    brings it up).

    Nothing here unlinks or replaces the claim, so the name never becomes free for another
    orchestrator to take meanwhile. On failure the claim stays for the caller's
    :func:`remove_netns`. No pyroute2 fallback: it would need the same unshare and mount,
    and it makes its own file exclusively.
    """
    return _create_claimed(name, lambda path: _bind_here(name, path, lo_up=False))


def create_vm_netns() -> socket.socket:
    """A new network namespace with no name, ``lo`` down, held by the probe returned (an
    rtnetlink socket made inside it, see :mod:`.pool`): a VM without TAP or uplink joins it
    through :func:`~.pool.open_netns`. Closing the probe frees it (once nothing else is in
    it). Nothing is mounted or written on the host."""
    try:
        return _run_in_new_netns(_unshare_net, new_probe)
    except OSError as exc:
        raise NetworkError(
            f"could not create a network namespace: {exc}; check that we run as root "
            "(CAP_SYS_ADMIN) and that no seccomp filter refuses unshare(CLONE_NEWNET)"
        ) from exc


def _create_claimed(name: str, body: Callable[[Path], None]) -> Path:
    path = netns_path(name)
    try:
        _run_in_new_netns(_unshare_net, lambda: body(path))
    except OSError as exc:
        raise NetworkError(
            f"could not create network namespace {name!r} at {path}: {exc}; check that we "
            "run as root (CAP_SYS_ADMIN) and that no seccomp filter refuses "
            "unshare(CLONE_NEWNET) or mount(); remove_netns() removes the claim"
        ) from exc
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
    once no process is left inside. A plain file there (a claim never bound, or a crash's
    leftover) is unlinked.
    """
    path = netns_path(name)
    try:
        # Unmount first, no stat before: the answer says what is there.
        _umount_detach(str(path))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return  # gone
        # EINVAL: not a mount point (a plain file or symlink; or unmounted concurrently).
        # EPERM (not root): only a plain file can be removed, and no namespace is there.
        if exc.errno not in (errno.EINVAL, errno.EPERM) or (
            exc.errno == errno.EPERM and _is_nsfs(path)
        ):
            raise NetworkError(
                f"could not remove network namespace {name!r} ({path}): {exc}; check that "
                f"we run as root, then retry or run `ip netns delete {name}`"
            ) from exc
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise NetworkError(
            f"could not remove network namespace {name!r} ({path}): {exc}; check that "
            f"we run as root, then retry or run `ip netns delete {name}` (umount {path}; "
            f"rm {path})"
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
    """Return the names of all links in a network namespace, by ifindex: ``netns`` is its
    name, or a path to it (such as ``vm.vmm.netns_path``)."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with _ipr(netns) as ipr:
            links = sorted(ipr.link("dump"), key=lambda m: m["index"])
            return [str(m.get("ifname")) for m in links]
    except NetlinkError as exc:
        raise NetworkError(f"could not list links in network namespace {netns!r}: {exc}") from exc
