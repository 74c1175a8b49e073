"""The VM id rule and every host name derived from an id: one home for each.

Start-up, stop, the registry and ``ironclaw gc`` all call these functions, so a name can
never be computed two ways (the bug this module exists for: the jailer names the jail after
the *resolved* exec file, ``firecracker-v1.0.0`` behind a ``firecracker`` symlink, while we
looked under ``firecracker``).

Pure functions apart from :func:`exec_file_name`, which resolves symlinks exactly as the
jailer canonicalises ``--exec-file``. Default root directories (run dir, state dir, chroot
base) are not decided here: callers pass the root.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from .errors import ConfigError, IronclawError, NetworkError

__all__ = [
    "ID_MAX_LENGTH",
    "ID_PATTERN",
    "ID_RULE",
    "JAIL_MARKER",
    "NETNS_PREFIX",
    "PARENT_CGROUP_NAME",
    "VMS_DIR",
    "check_id",
    "chroot_dir",
    "exec_file_name",
    "guest_mac",
    "id_from_netns",
    "is_valid_id",
    "jail_dir",
    "netns_name",
    "pid_file",
    "process_name",
    "real_path",
    "tap_name",
    "uplink_names",
    "vm_cgroup_path",
    "vm_run_dir",
]

#: Ids the jailer accepts are a superset (Unicode alphanumerics); we restrict to ASCII so an
#: id is safe everywhere: paths, cgroup names, netns names, log lines. Use with fullmatch
#: (``$`` would accept a trailing newline).
ID_MAX_LENGTH = 64
ID_PATTERN = re.compile(rf"[A-Za-z0-9-]{{1,{ID_MAX_LENGTH}}}")
ID_RULE = f"use 1 to {ID_MAX_LENGTH} characters from A-Z, a-z, 0-9 and '-'"

#: Every network namespace we create is named ``ironclaw-<vm_id>``.
NETNS_PREFIX = "ironclaw-"
#: Default name of the cgroup holding the VMs' cgroups (beneath the orchestrator's own).
PARENT_CGROUP_NAME = "ironclaw"
#: Written into every jail directory we create (outside the chroot ``root/``, so the guest
#: never sees it): gc removes an unrecorded jail directory only if it holds this file.
JAIL_MARKER = ".ironclaw"
#: Linux truncates a process name (``/proc/<pid>/comm``) to 15 bytes.
COMM_MAX = 15


def is_valid_id(value: object) -> bool:
    """True if ``value`` is a VM id we accept (the whole string, no trailing newline)."""
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def check_id(value: object, what: str = "vm_id", error: type[IronclawError] = ConfigError) -> str:
    """Return ``value`` if it is a valid id, else raise ``error`` naming ``what``."""
    if not is_valid_id(value):
        raise error(f"{what} {value!r} is invalid: {ID_RULE}")
    assert isinstance(value, str)
    return value


# --------------------------------------------------------------------------- jail


def real_path(path: Path | str) -> str:
    """``os.path.realpath(path)``: every symlink resolved, as ``realpath(3)`` does.

    An existing path is resolved by the kernel (``O_PATH`` open, then the descriptor's name in
    ``/proc/self/fd``): three system calls instead of an ``lstat`` per component and a
    Python loop. ``O_PATH`` opens nothing (no device is opened, no read access needed).
    Anything else (missing, or no ``/proc``) falls back to ``os.path.realpath``.
    """
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except (OSError, ValueError):
        return os.path.realpath(path)
    try:
        resolved = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)
    finally:
        os.close(fd)
    # Unlinked since it was opened ("... (deleted)"), or not a path we can name: resolve by
    # name, as realpath would.
    if not resolved.startswith("/") or resolved.endswith(" (deleted)"):
        return os.path.realpath(path)
    return resolved


def exec_file_name(exec_file: Path | str) -> str:
    """The name the jailer gives the jail, the copied binary, its process and pid file.

    The jailer canonicalises ``--exec-file`` (resolves every symlink) and uses the resolved
    file's basename: ``/usr/local/bin/firecracker -> firecracker-v1.0.0`` gives
    ``firecracker-v1.0.0``.
    """
    return os.path.basename(real_path(exec_file))


def jail_dir(chroot_base: Path, exec_name: str, vm_id: str) -> Path:
    """``<chroot base>/<exec name>/<id>``: everything the jailer makes for one VM."""
    return Path(chroot_base) / exec_name / check_id(vm_id)


def chroot_dir(jail: Path) -> Path:
    """The VMM's ``/`` on the host: ``<jail dir>/root``."""
    return jail / "root"


def pid_file(jail: Path) -> Path:
    """The jailer's pid file: ``<jail dir>/root/<exec name>.pid`` (exec name = parent dir)."""
    return chroot_dir(jail) / f"{jail.parent.name}.pid"


def process_name(exec_name: str) -> str:
    """The VMM's ``/proc/<pid>/comm``: the exec file name, truncated by the kernel."""
    return exec_name.encode()[:COMM_MAX].decode(errors="ignore")


# --------------------------------------------------------------------------- run dir, cgroups


#: Under the run root, the directory holding one private directory per VM.
VMS_DIR = "vms"


def vm_run_dir(run_root: Path, vm_id: str) -> Path:
    """The VM's private host-side directory: ``<run root>/vms/<id>``."""
    return Path(run_root) / VMS_DIR / check_id(vm_id)


def vm_cgroup_path(parent: str, vm_id: str) -> str:
    """A VM's cgroup, relative to each hierarchy's mount: ``<parent>/<id>``."""
    return f"{parent.strip('/')}/{check_id(vm_id)}".lstrip("/")


# --------------------------------------------------------------------------- network


def _digest(kind: str, vm_id: str) -> bytes:
    return hashlib.sha256(f"ironclaw:{kind}:{vm_id}".encode()).digest()


def _net_id(vm_id: str) -> str:
    if not is_valid_id(vm_id):
        raise NetworkError(f"invalid VM id {vm_id!r} for network naming: {ID_RULE}")
    return vm_id


def netns_name(vm_id: str) -> str:
    """The VM's network namespace: ``ironclaw-<vm_id>``."""
    return NETNS_PREFIX + _net_id(vm_id)


def id_from_netns(name: str) -> str | None:
    """The VM id of one of our namespace names, or ``None`` if it is not ours."""
    if not name.startswith(NETNS_PREFIX):
        return None
    vm_id = name[len(NETNS_PREFIX) :]
    return vm_id if is_valid_id(vm_id) else None


def tap_name(vm_id: str) -> str:
    """The VM's TAP device: ``icl`` + 12 hex digits of a hash of the id (fits IFNAMSIZ)."""
    return "icl" + _digest("tap", _net_id(vm_id)).hex()[:12]


def guest_mac(vm_id: str) -> str:
    """A deterministic, locally administered unicast MAC for the guest NIC (``06:00:..``)."""
    tail = _digest("mac", _net_id(vm_id))[:4]
    return ":".join(f"{b:02x}" for b in (0x06, 0x00, *tail))


def uplink_names(vm_id: str) -> tuple[str, str]:
    """``(host ifname, netns ifname)`` of the opt-in veth uplink: ``icv``/``icu`` + 12 hex."""
    digits = _digest("uplink", _net_id(vm_id)).hex()[:12]
    return "icv" + digits, "icu" + digits
