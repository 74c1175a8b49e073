"""Read-only checks of the host, run before anything is spawned (and by ``ironclaw doctor``)."""

from __future__ import annotations

import concurrent.futures
import fcntl
import ipaddress
import os
import socket
from collections.abc import Sequence
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import ChrootBaseError, ConfigError, HostError, KvmUnavailableError
from .config import MAX_SOCKET_PATH_BYTES

KVM_PATH = Path("/dev/kvm")


@dataclass(frozen=True)
class MountInfo:
    mount_point: Path
    fs_type: str
    options: frozenset[str]


def mount_of(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> MountInfo | None:
    """The mount holding ``path`` (longest matching mount point)."""
    target = str(path.resolve())
    best: MountInfo | None = None
    for line in mountinfo.read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 6 or not right:
            continue
        point = fields[4].replace("\\040", " ")
        fs_type = right.split()[0]
        opts = frozenset(fields[5].split(","))
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(str(best.mount_point))):
            best = MountInfo(Path(point), fs_type, opts)
    return best


def check_kvm(path: Path = KVM_PATH) -> None:
    if not path.exists():
        raise KvmUnavailableError(
            f"{path} does not exist: enable virtualization in firmware and load kvm_intel or "
            "kvm_amd (modprobe kvm_intel), or run on a host with nested virtualization"
        )
    if not os.access(path, os.R_OK | os.W_OK):
        raise KvmUnavailableError(
            f"{path} is not readable and writable by uid {os.geteuid()}: run as root or add "
            "the user to the kvm group (setfacl -m u:$USER:rw /dev/kvm)"
        )


def check_chroot_base(base: Path) -> None:
    """The base must exist, be a writable directory and allow exec and device nodes."""
    fix = f"sudo mkdir -p {base} && sudo chmod 755 {base} && sudo chown root:root {base}"
    if not base.exists():
        raise ChrootBaseError(f"chroot base directory {base} does not exist: {fix}")
    if not base.is_dir():
        raise ChrootBaseError(f"chroot base {base} is not a directory: remove it, then {fix}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ChrootBaseError(
            f"failed to create chroot: permission denied on {base} for uid {os.geteuid()}: "
            f"run as root and {fix}"
        )
    check_not_swappable(base, "chroot base", ChrootBaseError)
    mount = mount_of(base)
    if mount is not None:
        bad = sorted(mount.options & {"noexec", "nodev"})
        if bad:
            raise ChrootBaseError(
                f"chroot base {base} is on {mount.mount_point}, mounted {','.join(bad)}: the "
                "jailer needs exec and device nodes there; pick another chroot_base_dir or "
                f"remount (mount -o remount,exec,dev {mount.mount_point})"
            )


def swappable_reason(path: Path, *, must_exist: bool = True) -> str | None:
    """Why another user could swap ``path`` (or a directory above it) for a symlink, or None.

    We remove trees below such directories as root: a directory writable by group or others
    lets them rename what we made and plant a symlink, and ``rmtree`` would then delete the
    link's target. ``path`` must be a real directory owned by root or us and writable by
    nobody else; each directory above it must not be writable by others either, unless it
    is sticky (like /tmp: others cannot rename what they do not own).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if must_exist:
            return "it does not exist"
        st = None
    except OSError as exc:
        return f"it cannot be inspected ({exc.strerror})"
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            return f"it is a symlink (to {os.readlink(path)!r})"
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid not in (0, os.geteuid()):
            return f"it is owned by uid {st.st_uid}, not by root"
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            return (
                f"it is writable by group or others (mode {mode:04o}), so another user could "
                "rename the VM directories in it and plant symlinks that a cleanup as root "
                "would follow"
            )
    for parent in Path(os.path.abspath(path)).parents:
        try:
            pst = os.stat(parent)
        except OSError:
            continue
        pmode = stat.S_IMODE(pst.st_mode)
        if pmode & (stat.S_IWGRP | stat.S_IWOTH) and not pmode & stat.S_ISVTX:
            return (
                f"{parent} above it is writable by group or others without the sticky bit "
                f"(mode {pmode:04o}), so another user could swap the whole directory"
            )
    return None


def check_not_swappable(
    path: Path, what: str, error: type[HostError] | type[ConfigError] = HostError
) -> None:
    """Refuse ``path`` as a directory we create VM directories in (see swappable_reason)."""
    reason = swappable_reason(path)
    if reason is not None:
        raise error(
            f"refusing {what} {path}: {reason}. Use a root-owned directory that only root "
            f"can write: sudo mkdir -p {path} && sudo chown root:root {path} && "
            f"sudo chmod 755 {path}"
        )


def check_run_root(root: Path) -> None:
    """The orchestrator's run directory root must not be swappable by other users."""
    reason = swappable_reason(root, must_exist=False)
    if reason is not None:
        raise ConfigError(
            f"refusing run directory {root} (IRONCLAW_RUN_DIR): {reason}. Unset "
            "IRONCLAW_RUN_DIR (default /run/ironclaw) or point it at a directory only root "
            "can write"
        )


def check_socket_budget(path: Path, what: str = "API socket") -> None:
    size = len(str(path).encode())
    if size > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(
            f"{what} path {path} is {size} bytes, over the {MAX_SOCKET_PATH_BYTES}-byte limit of "
            f"Unix socket paths (firecracker would start but nobody could connect): shorten the "
            f"id (by {size - MAX_SOCKET_PATH_BYTES} bytes), the chroot base or the exec file name"
        )


def is_root() -> bool:
    return os.geteuid() == 0


# --------------------------------------------------------------------------- input vs host
# Checks of configured values that need the host (RAM, routes, a netns file): read-only,
# run before anything is made. The pure part of each rule lives in ``vm.config``.

MEMINFO_PATH = Path("/proc/meminfo")
PROC_NET_ROUTE = Path("/proc/net/route")
#: ``_IO(0xb7, 0x3)``: which kind of namespace a namespace file refers to.
_NS_GET_NSTYPE = 0xB703
_CLONE_NEWNET = 0x40000000


def host_memory_mib(meminfo: Path = MEMINFO_PATH) -> int | None:
    """The host's RAM (``MemTotal``) in MiB; ``None`` if it cannot be read."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_guest_memory(memory_mb: int, meminfo: Path = MEMINFO_PATH) -> None:
    """Refuse guest memory larger than the host's RAM (it could never be backed)."""
    total = host_memory_mib(meminfo)
    if total is not None and memory_mb > total:
        raise ConfigError(
            f"memory_mb={memory_mb} is more than this host's RAM ({total} MiB, MemTotal in "
            f"{meminfo}): give the guest at most {total} MiB, less what the host needs"
        )


def check_netns_path(path: str, key: str = "jailer.netns") -> None:
    """``path`` must name a network namespace (``/run/netns/NAME``, ``/proc/PID/ns/net``)."""
    hint = "create it (ip netns add NAME) or leave netns unset to get a private one"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError(f"{key} {path} does not exist: {hint}") from None
    except OSError as exc:
        raise ConfigError(f"{key} {path} cannot be opened: {exc.strerror}; {hint}") from None
    try:
        kind = fcntl.ioctl(fd, _NS_GET_NSTYPE)
    except OSError:
        kind = None
    finally:
        os.close(fd)
    if kind != _CLONE_NEWNET:
        raise ConfigError(f"{key} {path} is not a network namespace file: {hint}")


@dataclass(frozen=True)
class HostRoute:
    """An IPv4 route of the host (any routing table)."""

    network: ipaddress.IPv4Network
    device: str | None = None
    table: int | None = None

    def __str__(self) -> str:
        dev = f" dev {self.device}" if self.device else ""
        table = f" table {self.table}" if self.table not in (None, 254) else ""
        return f"{self.network}{dev}{table}"


def _ifname(index: int | None) -> str | None:
    if not index:
        return None
    try:
        return socket.if_indextoname(index)
    except OSError:
        return str(index)


def _routes_netlink() -> list[HostRoute]:
    from pyroute2 import IPRoute

    routes = []
    with IPRoute() as ipr:
        for msg in ipr.route("dump", family=socket.AF_INET):
            dst = msg.get_attr("RTA_DST") or "0.0.0.0"
            net = ipaddress.IPv4Network(f"{dst}/{msg['dst_len']}", strict=False)
            table = msg.get_attr("RTA_TABLE") or msg["table"]
            routes.append(HostRoute(net, _ifname(msg.get_attr("RTA_OIF")), table))
    return routes


def _routes_proc(path: Path = PROC_NET_ROUTE) -> list[HostRoute]:
    """The main table from ``/proc/net/route`` (little-endian hex destination and mask)."""
    routes = []
    for line in path.read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        dst = ipaddress.IPv4Address(int(fields[1], 16).to_bytes(4, "little"))
        mask = ipaddress.IPv4Address(int(fields[7], 16).to_bytes(4, "little"))
        routes.append(HostRoute(ipaddress.IPv4Network(f"{dst}/{mask}", strict=False), fields[0]))
    return routes


def host_ipv4_routes() -> list[HostRoute]:
    """Every IPv4 route of the host, all tables (netlink); ``/proc/net/route`` as fallback.

    pyroute2's synchronous client runs an event loop of its own, so it is used from a
    short-lived worker thread (callers may be inside a running loop).
    """
    try:
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="routes") as pool:
            return pool.submit(_routes_netlink).result(timeout=30)
    except Exception:  # netlink refused (seccomp, no NETLINK_ROUTE): the main table will do
        try:
            return _routes_proc()
        except (OSError, ValueError) as exc:
            raise HostError(f"cannot read the host's routes: {exc}") from exc


def route_conflicts(subnet: ipaddress.IPv4Network, routes: Sequence[HostRoute]) -> list[HostRoute]:
    """The routes ``subnet`` overlaps, default routes aside (they overlap everything)."""
    return [r for r in routes if r.network.prefixlen > 0 and r.network.overlaps(subnet)]


def check_uplink_routes(subnet: str, routes: Sequence[HostRoute] | None = None) -> None:
    """Refuse an uplink /30 that overlaps any host route or address (all routing tables)."""
    net = ipaddress.IPv4Network(subnet)
    clashes = route_conflicts(net, host_ipv4_routes() if routes is None else routes)
    if clashes:
        shown = ", ".join(str(r) for r in clashes[:5])
        raise ConfigError(
            f"uplink_subnet {subnet} overlaps the host's route(s) {shown}: traffic would be "
            "routed to the wrong place; pick a /30 no host route covers (see `ip route show "
            "table all`)"
        )
