"""Configuration rules shared by ``VmConfig`` and ``JailerConfig``: bounds, defaults, and the
checks on host paths, jail paths, ids and CPU lists (pure, no I/O).

Hostile input is refused here, naming the key: values are strictly typed (``true`` is not
the integer 1, ``"2"`` is not 2), sizes have upper bounds, host paths are made absolute
(so what is recorded can be cleaned up from any directory) and may not hold control
characters. Bad values raise ``ConfigError`` listing every bad key (:func:`config_error`).
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Strict, ValidationError

from ..errors import ConfigError
from ..names import ID_RULE, PARENT_CGROUP_NAME, is_valid_id

#: Linux ``sun_path`` holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
#: Firecracker's own limit on vCPUs.
MAX_VCPUS = 32
MIN_MEMORY_MIB = 128
#: Hard bound on guest memory (1 TiB); the host's own RAM is checked at start
#: (:func:`ironclaw_orchestrator.vm.hostcheck.check_guest_memory`).
MAX_MEMORY_MIB = 1 << 20
#: The kernel's smallest CFS quota (``cpu.max`` / ``cpu.cfs_quota_us``), in microseconds.
MIN_CPU_QUOTA_US = 1000
#: Hard bound on a VM's cgroup memory limits and head-room.
MAX_MEMORY_LIMIT_MIB = 2 * MAX_MEMORY_MIB
MAX_MEMORY_HEADROOM_MIB = 64 << 10
#: A Linux (x86) guest reads at most 2047 bytes of its command line (COMMAND_LINE_SIZE 2048,
#: with the NUL) and drops the rest; Firecracker itself takes longer lines. Printable ASCII.
MAX_BOOT_ARGS = 2047
#: What Firecracker v1.0 appends to the command line for each virtio device (the guest finds
#: its devices by it): `` virtio_mmio.device=4K@0xd0000000:5``, room left for a 2-digit IRQ.
FIRECRACKER_DEVICE_ARG = " virtio_mmio.device=4K@0xd0000000:15"
#: ... and for the root drive, before those: `` root=/dev/vda rw`` (``ro`` when read-only).
FIRECRACKER_ROOT_ARG = " root=/dev/vda rw"
#: Linux PATH_MAX (including the NUL) and NAME_MAX.
MAX_PATH_BYTES = 4095
MAX_NAME_BYTES = 255
#: The kernel's ceiling for ``pids.max`` (PID_MAX_LIMIT) and for RLIMIT_NOFILE (nr_open).
MAX_PIDS = 1 << 22
MAX_NO_FILE = 1 << 20
#: Byte and IOPS figures end up in 64-bit kernel counters.
MAX_U63 = (1 << 63) - 1
#: What the VMM itself needs on top of guest memory (Firecracker publishes <= 5 MiB; the
#: jailer's copy of the exec file and page tables need a little more).
VMM_OVERHEAD_MIB = 16
#: Default head-room above guest memory when the memory limit is derived from ``VmConfig``.
DEFAULT_MEMORY_HEADROOM_MIB = 64
#: The unprivileged uid/gid the VMM runs as unless configured.
DEFAULT_JAIL_UID = 64_000
DEFAULT_JAIL_GID = 64_000
DEFAULT_BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off"
#: Budget for a VM's console files (serial output + firecracker's log), see ``vm.consolelog``.
DEFAULT_CONSOLE_LIMIT_BYTES = 4 << 20
MIN_CONSOLE_LIMIT_BYTES = 16 << 10
MAX_CONSOLE_LIMIT_BYTES = 1 << 30
DEFAULT_JAILER_BINARY = Path("/usr/local/bin/jailer")
DEFAULT_EXEC_FILE = Path("/usr/local/bin/firecracker-v1.14.1")
DEFAULT_CHROOT_BASE = Path("/var/jail")
DEFAULT_API_SOCK = PurePosixPath("/run/firecracker.socket")
DEFAULT_PARENT_CGROUP_NAME = PARENT_CGROUP_NAME


def check_id(value: str, what: str = "vm_id") -> str:
    if not is_valid_id(value):
        raise ValueError(f"{what} {value!r} is invalid: {ID_RULE}")
    return value


#: A host path: ``str`` from TOML/JSON is accepted (the one lax type; everything else is
#: strict), then :func:`host_path` refuses control characters and makes it absolute.
HostPath = Annotated[Path, Strict(False)]
JailPath = Annotated[PurePosixPath, Strict(False)]
#: A list (TOML, JSON) or tuple of host directories.
ImageDirs = Annotated[tuple[HostPath, ...], Strict(False)]


def _control_free(value: str, what: str) -> None:
    bad = next((c for c in value if ord(c) < 0x20 or ord(c) == 0x7F), None)
    if bad is not None:
        raise ValueError(f"{what} {value!r} contains the control character {bad!r}: remove it")


def host_path(value: str | Path, what: str) -> str:
    """``value`` checked (not empty, no control characters, fits PATH_MAX) and absolute.

    A relative path is taken relative to the current directory now, so the path that is
    recorded (and later cleaned up, possibly by another process) is the one meant.
    """
    text = str(value)
    if not text:
        raise ValueError(f"{what} is empty: give a path")
    _control_free(text, what)
    if len(os.fsencode(text)) > MAX_PATH_BYTES:
        raise ValueError(f"{what} is longer than {MAX_PATH_BYTES} bytes: shorten it")
    if any(len(os.fsencode(part)) > MAX_NAME_BYTES for part in text.split("/")):
        raise ValueError(f"{what} {text!r} has a component over {MAX_NAME_BYTES} bytes")
    return text if os.path.isabs(text) else os.path.abspath(text)


def _jail_path(value: PurePosixPath, what: str) -> PurePosixPath:
    text = str(value)
    _control_free(text, what)
    if not value.is_absolute() or ".." in value.parts:
        raise ValueError(f"{what} {text!r} must be an absolute jail-relative path without '..'")
    if len(text.encode()) > MAX_PATH_BYTES:
        raise ValueError(f"{what} is longer than {MAX_PATH_BYTES} bytes: shorten it")
    return value


def _image_dirs(value: tuple[Path, ...] | None, what: str) -> tuple[Path, ...] | None:
    if value is None:
        return None
    if not value:
        raise ValueError(f"{what} is empty: list at least one directory, or leave it unset")
    for path in value:
        if not str(path).startswith("/"):
            raise ValueError(f"{what} entry {str(path)!r} must be an absolute directory")
        host_path(path, what)
    return value


def _reject_special_network(net: ipaddress.IPv4Network, what: str, value: str) -> None:
    """Refuse addresses that are never a VM's to use: loopback, multicast, 0/8, 240/4."""
    for flag, name in (
        (net.is_loopback, "loopback"),
        (net.is_multicast, "multicast"),
        (net.is_reserved, "reserved (240.0.0.0/4)"),
        (net.subnet_of(ipaddress.IPv4Network("0.0.0.0/8")), "'this network' (0.0.0.0/8)"),
    ):
        if flag:
            raise ValueError(
                f"{what} {value!r} is in the {name} range: use a private range such as "
                "10.0.0.0/8 or 172.16.0.0/12"
            )


def _cpu_list(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    if not re.fullmatch(r"[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*", value):  # ASCII: the kernel's
        raise ValueError(f"{what} {value!r} is not a CPU/node list such as '0', '0-3' or '0,2'")
    for part in value.split(","):
        lo, _, hi = part.partition("-")
        if hi and int(hi) < int(lo):
            raise ValueError(f"{what} {value!r}: range {part!r} runs backwards")
    return value


# Validators delegate to plain (static)methods: mutation testing (scripts/mutation.py) cannot
# mutate a decorated function, so the rules live in undecorated ones.


class _Model(BaseModel):
    """Base: unknown keys are errors, and bad values raise ``ConfigError`` (not pydantic's)."""

    # strict: no bool for int, no "2" for 2 (TOML, JSON and keyword arguments alike).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, strict=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise config_error(exc, type(self).__name__) from None

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise config_error(exc, type(self).__name__) from None


def config_error(exc: ValidationError, source: str = "config") -> ConfigError:
    """A ``ConfigError`` listing each bad key with its message."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        nested = err.get("ctx", {}).get("error")
        if isinstance(nested, ConfigError):
            # A nested model (e.g. ``jailer``) already listed its keys: prefix them with ours.
            for line in str(nested).splitlines()[1:]:
                key, _, msg = line.strip().partition(": ")
                lines.append(f"  {loc}.{key}: {msg}" if loc else f"  {key}: {msg}")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc or '(top level)'}: {msg}")
    return ConfigError(f"invalid {source}:\n" + "\n".join(lines))
