"""Read-only checks of the host, run before anything is spawned (and by ``ironclaw doctor``)."""

from __future__ import annotations

import concurrent.futures
import fcntl
import ipaddress
import os
import socket
from collections.abc import Sequence
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
    mount = mount_of(base)
    if mount is not None:
        bad = sorted(mount.options & {"noexec", "nodev"})
        if bad:
            raise ChrootBaseError(
                f"chroot base {base} is on {mount.mount_point}, mounted {','.join(bad)}: the "
                "jailer needs exec and device nodes there; pick another chroot_base_dir or "
                f"remount (mount -o remount,exec,dev {mount.mount_point})"
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
