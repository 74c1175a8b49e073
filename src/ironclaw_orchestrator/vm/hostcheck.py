"""Checks of the host, run before anything is spawned and by ``ironclaw doctor``.

The one home of every host check. Each question has an ``inspect_*`` function that returns
a :class:`Finding` (``pass`` / ``warn`` / ``fail``, what was found, how to fix it) and never
raises for a host problem; ``ironclaw doctor`` reports findings as they are. The launch path
uses the ``check_*`` wrappers, which raise the matching error of the error tree for a
``fail`` and ignore warnings. Nothing here writes, except the write probe ``doctor`` asks
for (a temporary directory, removed at once).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import ChrootBaseError, ConfigError, KvmUnavailableError
from ..names import ID_MAX_LENGTH
from .config import MAX_SOCKET_PATH_BYTES, JailerConfig
from .hostroutes import PROC_NET_ROUTE as PROC_NET_ROUTE
from .hostroutes import HostRoute as HostRoute
from .hostroutes import check_uplink_routes as check_uplink_routes
from .hostroutes import host_ipv4_routes as host_ipv4_routes
from .hostroutes import route_conflicts as route_conflicts
from .netns import NETNS_DIR, TUN_DEVICE

KVM_PATH = Path("/dev/kvm")
MOUNTINFO_PATH = Path("/proc/self/mountinfo")
#: How to make a usable chroot base; ``{base}`` is its path.
CHROOT_BASE_FIX = "sudo mkdir -p {base} && sudo chmod 755 {base} && sudo chown root:root {base}"

Level = Literal["pass", "warn", "fail"]


@dataclass(frozen=True)
class Finding:
    """The answer of one host check."""

    level: Level
    #: What was found (a path, a mode, a size), phrased to follow the subject of the check.
    value: str
    #: One line saying how to fix it; empty when the check passed.
    fix: str = ""
    #: Machine-readable extras (sizes, limits).
    details: dict[str, object] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.level == "fail"

    @property
    def message(self) -> str:
        """``value: fix``, the text of the error the ``check_*`` wrappers raise."""
        return f"{self.value}: {self.fix}" if self.fix else self.value


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


def inspect_kvm(path: Path = KVM_PATH) -> Finding:
    """Can we open ``/dev/kvm`` read-write (what firecracker does)?"""
    if not path.exists():
        return Finding(
            "fail",
            f"{path} does not exist",
            "enable virtualization in firmware and load kvm_intel or kvm_amd (modprobe "
            "kvm_intel), or run on a host with nested virtualization",
        )
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return Finding(
            "fail",
            f"{path} cannot be opened read-write by uid {os.geteuid()}: {exc.strerror}",
            "run as root or add the user to the kvm group (setfacl -m u:$USER:rw /dev/kvm)",
        )
    os.close(fd)
    return Finding("pass", f"{path} is readable and writable")


def check_kvm(path: Path = KVM_PATH) -> None:
    finding = inspect_kvm(path)
    if finding.failed:
        raise KvmUnavailableError(finding.message)


def inspect_root(geteuid: Callable[[], int] = os.geteuid) -> Finding:
    """Do we run as root (the jailer must be started by root)?"""
    uid = geteuid()
    if uid == 0:
        return Finding("pass", "running as root (uid 0)")
    return Finding(
        "fail",
        f"running as uid {uid}",
        "the jailer must be started by root: run ironclaw as root (sudo)",
    )


def is_root(geteuid: Callable[[], int] = os.geteuid) -> bool:
    return not inspect_root(geteuid).failed


def inspect_chroot_base(
    base: Path, *, mountinfo: Path = MOUNTINFO_PATH, write_probe_prefix: str | None = None
) -> Finding:
    """Is ``base`` a writable directory on a mount that allows exec and device nodes?

    Writability is judged with ``access(2)``, or, given ``write_probe_prefix``, by creating
    (and at once removing) a directory of that prefix in it. A tmpfs, or a mount missing
    from ``mountinfo``, is a warning.
    """
    fix = CHROOT_BASE_FIX.format(base=base)
    if not base.exists():
        return Finding("fail", f"chroot base directory {base} does not exist", fix)
    if not base.is_dir():
        return Finding("fail", f"chroot base {base} is not a directory", f"remove it, then {fix}")
    if write_probe_prefix is None:
        if not os.access(base, os.W_OK | os.X_OK):
            return Finding(
                "fail",
                # The words of the jailer's own error, which users search for.
                f"failed to create chroot: permission denied on {base} for uid {os.geteuid()}",
                f"run as root and {fix}",
            )
    else:
        try:
            probe = tempfile.mkdtemp(prefix=write_probe_prefix, dir=base)
        except OSError as exc:
            return Finding("fail", f"chroot base {base} is not writable: {exc.strerror}", fix)
        try:
            os.rmdir(probe)
        except OSError as exc:
            return Finding(
                "fail", f"could not remove the write probe {probe}: {exc.strerror}",
                f"remove it by hand (rmdir {probe}) and check the permissions of {base}",
            )  # fmt: skip
    try:
        mount = mount_of(base, mountinfo)
    except OSError:
        mount = None
    if mount is None:
        return Finding(
            "warn", f"{base}: mount not found in {mountinfo}",
            "check that it is not mounted noexec/nodev",
        )  # fmt: skip
    bad = sorted(mount.options & {"noexec", "nodev"})
    where = f"{base} on {mount.mount_point} ({mount.fs_type}, {','.join(sorted(mount.options))})"
    if bad:
        return Finding(
            "fail",
            f"chroot base {where}: mounted {','.join(bad)}, but the jailer needs exec and "
            "device nodes there",
            f"remount (mount -o remount,exec,dev {mount.mount_point}) or pick another "
            "chroot_base_dir on a disk-backed filesystem",
        )
    if mount.fs_type == "tmpfs":
        return Finding(
            "warn", f"{where}: tmpfs",
            "use a disk-backed directory: staged disks would use RAM and tmpfs mounts are "
            "often nodev after a reboot",
        )  # fmt: skip
    return Finding("pass", where)


#: Chroot bases that passed, by what the verdict depends on (see ``_chroot_base_key``).
_chroot_bases_ok: set[tuple[object, ...]] = set()


def _chroot_base_key(base: Path) -> tuple[object, ...] | None:
    """The directory (inode, owner, mode), its filesystem (device: a mount's type is fixed
    for its device) and that mount's exec/dev/read-only flags: a change to any of them
    re-runs the full check. Costs a stat and a statvfs instead of parsing the mount table."""
    try:
        st = os.stat(base)
        flags = os.statvfs(base).f_flag & (os.ST_NOEXEC | os.ST_NODEV | os.ST_RDONLY)
    except OSError:
        return None
    return (str(base), st.st_dev, st.st_ino, st.st_uid, st.st_mode, flags, os.geteuid())


def check_chroot_base(base: Path, *, mountinfo: Path = MOUNTINFO_PATH) -> None:
    """The base must exist, be a writable directory and allow exec and device nodes."""
    key = _chroot_base_key(base) if mountinfo == MOUNTINFO_PATH else None
    if key is not None and key in _chroot_bases_ok:
        return
    finding = inspect_chroot_base(base, mountinfo=mountinfo)
    if finding.failed:
        raise ChrootBaseError(finding.message)
    if key is not None and len(_chroot_bases_ok) < 64:
        _chroot_bases_ok.add(key)


def socket_path_bytes(path: Path) -> int:
    """The length of ``path`` as the kernel counts it for a Unix socket address."""
    return len(str(path).encode())


def check_socket_budget(path: Path, what: str = "API socket") -> None:
    size = socket_path_bytes(path)
    if size > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(
            f"{what} path {path} is {size} bytes, over the {MAX_SOCKET_PATH_BYTES}-byte limit of "
            f"Unix socket paths (firecracker would start but nobody could connect): shorten the "
            f"id (by {size - MAX_SOCKET_PATH_BYTES} bytes), the chroot base or the exec file name"
        )


def inspect_socket_budget(config: JailerConfig, exec_name: str) -> Finding:
    """Does the API socket path of a VM with the longest id fit the Unix socket limit?

    A warning says how long ids may be; a failure means not even a 1-character id fits.
    """
    probe = config.model_copy(
        update={"jailer_id": "x" * ID_MAX_LENGTH, "exec_file": Path("/") / exec_name}
    )
    size = socket_path_bytes(probe.api_socket_path)
    over = size - MAX_SOCKET_PATH_BYTES
    value = (
        f"{config.chroot_base_dir}/{exec_name}/<{ID_MAX_LENGTH}-char id>/root{config.api_sock}: "
        f"{size} of {MAX_SOCKET_PATH_BYTES} bytes"
    )
    details: dict[str, object] = {"bytes": size, "limit": MAX_SOCKET_PATH_BYTES}
    if over <= 0:
        return Finding("pass", value, details=details)
    longest = ID_MAX_LENGTH - over
    details["max_id_length"] = max(longest, 0)
    fix = (
        f"keep VM ids to {max(longest, 0)} characters, or shorten chroot_base_dir or the exec "
        "file name"
    )
    if longest >= 1:
        return Finding("warn", f"{value}; ids up to {longest} characters fit", fix, details)
    return Finding("fail", f"{value}; not even a 1-character id fits", fix, details)


def inspect_netns_support(
    *, proc: Path = Path("/proc"), netns_dir: Path = NETNS_DIR, needed: bool = True
) -> Finding:
    """Does the kernel have network namespaces, and can ``netns_dir`` be written or made?

    Nothing is created. Problems are failures when the VMs need a namespace of ours
    (``needed``), else warnings.
    """
    bad: Level = "fail" if needed else "warn"
    ns_file = proc / "self" / "ns" / "net"
    if not ns_file.exists():
        return Finding(
            bad, f"{ns_file} missing: no network namespace support",
            "use a kernel with CONFIG_NET_NS=y",
        )  # fmt: skip
    if netns_dir.is_dir():
        ok = os.access(netns_dir, os.W_OK | os.X_OK)
        value = f"{netns_dir} is {'writable' if ok else 'not writable'}"
    else:
        parent = netns_dir.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        ok = os.access(parent, os.W_OK | os.X_OK)
        value = f"{netns_dir} missing; {'can' if ok else 'cannot'} be created under {parent}"
    if ok:
        return Finding("pass", f"supported; {value}")
    return Finding(bad, value, f"run as root so {netns_dir} can be written")


def inspect_tun(path: Path = TUN_DEVICE) -> Finding:
    """Does the TUN/TAP device exist (needed only for VMs with networking)?"""
    if path.exists():
        return Finding("pass", f"{path} exists")
    return Finding("warn", f"{path} missing (needed only for enable_networking)", "modprobe tun")


# --------------------------------------------------------------------------- input vs host
# Checks of configured values that need the host (RAM, routes, a netns file): read-only,
# run before anything is made. The pure part of each rule lives in ``vm.config``.

MEMINFO_PATH = Path("/proc/meminfo")
#: ``_IO(0xb7, 0x3)``: which kind of namespace a namespace file refers to.
_NS_GET_NSTYPE = 0xB703
_CLONE_NEWNET = 0x40000000


#: ``MemTotal`` of /proc/meminfo, by the kernel's count of RAM pages when it was read.
_mem_total: dict[int, int] = {}


def _ram_pages() -> int | None:
    """The kernel's count of usable RAM pages (``sysinfo(2)``: one system call)."""
    try:
        return os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return None


def host_memory_mib(meminfo: Path = MEMINFO_PATH) -> int | None:
    """The host's RAM (``MemTotal``) in MiB; ``None`` if it cannot be read.

    Asked on every start, so /proc/meminfo's ``MemTotal`` is kept while the kernel's RAM
    page count (``sysinfo``, the number ``MemTotal`` is made from) stays the same: memory
    hot-plugged or removed reads the file again. Only the total is kept, never free memory.
    """
    pages = _ram_pages() if meminfo == MEMINFO_PATH else None
    if pages is not None and pages in _mem_total:
        return _mem_total[pages]
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) // 1024
                break
        else:
            return None
    except (OSError, ValueError, IndexError):
        return None
    if pages is not None:
        _mem_total.clear()
        _mem_total[pages] = total
    return total


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
