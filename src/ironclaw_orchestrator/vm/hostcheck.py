"""Read-only checks of the host, run before anything is spawned (and by ``ironclaw doctor``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ChrootBaseError, ConfigError, KvmUnavailableError
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
