"""Configuration models: ``VmConfig`` and ``JailerConfig`` (spec: Configuration Reference).

Pure validation, no I/O: constructing a config never touches the host. Checks that need the
host (files exist, binaries found, socket path fits) run in :func:`preflight` steps right
before anything is spawned or written, so that bad input is still rejected first.

Deviations from the spec, because the real jailer behaves differently:

* limits become real cgroup files (``memory.limit_in_bytes=`` / ``memory.max=``,
  ``cpu.cfs_quota_us=`` / ``cpu.max=``), never the spec's invalid ``--cgroup cpu:1``;
* the API socket lives in the jail's ``root/`` directory on the host
  (``<chroot_base>/<exec name>/<id>/root/run/firecracker.socket``);
* the jailer needs ``uid``/``gid``; ours default to one fixed unprivileged id, never 0.

Hostile input is refused here, naming the key: values are strictly typed (``true`` is not
the integer 1, ``"2"`` is not 2), sizes have upper bounds, host paths are made absolute
(so what is recorded can be cleaned up from any directory) and may not hold control
characters, and the kernel command line is printable ASCII, as Firecracker requires.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..errors import ConfigError
from ..names import ID_RULE, PARENT_CGROUP_NAME, exec_file_name, is_valid_id
from .cmdline import add_param, has_param
from .ratelimit import RateLimit, VsockRateLimit

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
    if not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", value):
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


class JailerConfig(_Model):
    """How to jail one Firecracker process (spec: JailerConfig).

    The first seven fields and their defaults are the spec's; the rest are what the real jailer
    and the Resource Limits sections need. Limits left ``None`` are not set.
    """

    jailer_binary: HostPath = DEFAULT_JAILER_BINARY
    jailer_id: str = "ironclaw-vm"
    chroot_base_dir: HostPath = DEFAULT_CHROOT_BASE
    exec_file: HostPath = DEFAULT_EXEC_FILE
    cpu_count: int = Field(default=1, ge=1, le=MAX_VCPUS)
    memory_limit_mb: int = Field(default=256, ge=MIN_MEMORY_MIB, le=MAX_MEMORY_LIMIT_MIB)
    netns: str | None = None
    #: With ``netns`` unset: give the VM a private network namespace of its own
    #: (``ironclaw-<id>``, created before the jailer runs and deleted at stop). ``False``
    #: leaves the VMM in the host's namespace (not recommended).
    isolate_network: bool = True

    uid: int = Field(default=DEFAULT_JAIL_UID, ge=1, le=2**32 - 2)
    gid: int = Field(default=DEFAULT_JAIL_GID, ge=1, le=2**32 - 2)
    #: 1 or 2; ``None`` detects the host's layout.
    cgroup_version: Literal[1, 2] | None = None
    #: Relative to each hierarchy's root. ``None``: ``<the orchestrator's own cgroup>/ironclaw``.
    parent_cgroup: str | None = None
    #: Run the VMM as PID 1 of a new PID namespace (it cannot see or signal host processes).
    new_pid_ns: bool = True
    #: Jailer ``--resource-limit no-file=`` (jailer default 2048) and ``fsize=`` (bytes).
    no_file: int | None = Field(default=2048, ge=16, le=MAX_NO_FILE)
    fsize: int | None = Field(default=None, ge=1, le=MAX_U63)
    #: Jail-relative path of the API socket.
    api_sock: JailPath = DEFAULT_API_SOCK
    #: Confine staged files (kernel, disks) to these directories, symlinks resolved.
    #: ``None``: ``IRONCLAW_IMAGE_DIRS`` (colon-separated) if set, else no confinement.
    image_dirs: ImageDirs | None = None
    #: Host path of a custom seccomp filter (compiled with Firecracker's seccompiler-bin for
    #: this exact release), staged into the jail; ``None`` keeps Firecracker's built-in one.
    seccomp_filter: Path | None = None
    #: Run the VMM without seccomp (``--no-seccomp``): refused when a sandbox is required.
    no_seccomp: bool = False
    #: Confine jailer and VMM with this AppArmor profile (``ironclaw security profile``).
    apparmor_profile: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    #: Run jailer and VMM with this SELinux context, e.g. ``system_u:system_r:ironclaw_vmm_t:s0``.
    selinux_label: str | None = Field(
        default=None, pattern=r"^[a-z0-9_]+:[a-z0-9_]+:[a-z0-9_]+(:[A-Za-z0-9_.,:-]+)?$"
    )

    # Resource limits beyond cpu_count / memory_limit_mb (spec Phase 2).
    cpu_period_us: int = Field(default=100_000, ge=1_000, le=1_000_000)
    #: CPU time quota in CPUs, may be fractional (``0.5`` = half a CPU). Default: ``cpu_count``.
    cpu_limit: float | None = Field(default=None, ge=0.01, le=MAX_VCPUS)
    #: Relative CPU weight, 1..10000 (v2 ``cpu.weight``; v1 ``cpu.shares`` scaled).
    cpu_weight: int | None = Field(default=None, ge=1, le=10_000)
    #: v2 ``memory.high`` (throttle before the hard limit); v1 ``memory.soft_limit_in_bytes``.
    memory_high_mb: int | None = Field(default=None, ge=1, le=MAX_MEMORY_LIMIT_MIB)
    #: Pin the VMM's threads, e.g. ``"0-1"``; ``cpuset_mems`` defaults to the parent's nodes.
    cpuset_cpus: str | None = None
    cpuset_mems: str | None = None
    pids_max: int | None = Field(default=None, ge=1, le=MAX_PIDS)
    #: Disk throttling for the device holding the VM's disks (v2 ``io.max``, v1 ``blkio``).
    io_read_bps: int | None = Field(default=None, ge=1, le=MAX_U63)
    io_write_bps: int | None = Field(default=None, ge=1, le=MAX_U63)
    io_read_iops: int | None = Field(default=None, ge=1, le=MAX_U63)
    io_write_iops: int | None = Field(default=None, ge=1, le=MAX_U63)

    _check_id = field_validator("jailer_id")(lambda v: check_id(v, "jailer_id"))

    @field_validator("cpuset_cpus", "cpuset_mems")
    @classmethod
    def _lists(cls, v: str | None, info: object) -> str | None:
        return _cpu_list(v, getattr(info, "field_name", "cpuset"))

    @field_validator("api_sock")
    @classmethod
    def _abs_sock(cls, v: PurePosixPath) -> PurePosixPath:
        return _jail_path(v, "api_sock")

    @field_validator("jailer_binary", "exec_file", "chroot_base_dir", mode="before")
    @classmethod
    def _host_paths(cls, v: object, info: ValidationInfo) -> object:
        # Before conversion: Path("") would already be ".", the current directory.
        return host_path(v, str(info.field_name)) if isinstance(v, str | Path) else v

    @field_validator("image_dirs")
    @classmethod
    def _dirs(cls, v: tuple[Path, ...] | None) -> tuple[Path, ...] | None:
        return _image_dirs(v, "image_dirs")

    @field_validator("cgroup_version", mode="before")
    @classmethod
    def _version(cls, v: object) -> object:
        return cls._check_version(v)

    @staticmethod
    def _check_version(v: object) -> object:
        # Literal[1, 2] alone would take True (== 1) and 2.0.
        if v is not None and (type(v) is not int or v not in (1, 2)):
            raise ValueError(f"cgroup_version {v!r} must be the integer 1 or 2 (or unset)")
        return v

    @field_validator("parent_cgroup")
    @classmethod
    def _rel_cgroup(cls, v: str | None) -> str | None:
        return cls._check_rel_cgroup(v)

    @staticmethod
    def _check_rel_cgroup(v: str | None) -> str | None:
        if v is None:
            return None
        parts = [p for p in v.strip("/").split("/") if p]
        if not parts or any(
            p in (".", "..") or not re.fullmatch(r"[A-Za-z0-9_.:@-]{1,255}", p) for p in parts
        ):
            raise ValueError(f"parent_cgroup {v!r} must be a relative path like 'ironclaw'")
        return "/".join(parts)

    @field_validator("netns")
    @classmethod
    def _netns_abs(cls, v: str | None) -> str | None:
        return cls._check_netns_abs(v)

    @staticmethod
    def _check_netns_abs(v: str | None) -> str | None:
        if v is None:
            return None
        if not v.startswith("/"):
            raise ValueError(f"netns {v!r} must be an absolute path such as /run/netns/NAME")
        return host_path(v, "netns")

    @model_validator(mode="after")
    def _quota_expressible(self) -> JailerConfig:
        return self._check_quota_expressible()

    def _check_quota_expressible(self) -> JailerConfig:
        cpus = self.cpu_limit if self.cpu_limit is not None else self.cpu_count
        quota = round(cpus * self.cpu_period_us)
        if quota < MIN_CPU_QUOTA_US:
            # Rounding up to the kernel's minimum would silently grant more CPU than asked.
            raise ValueError(
                f"cpu_limit={cpus} with cpu_period_us={self.cpu_period_us} is a quota of "
                f"{quota} us, below the kernel's minimum of {MIN_CPU_QUOTA_US} us: raise "
                f"cpu_period_us to at least {math.ceil(MIN_CPU_QUOTA_US / cpus)}"
            )
        return self

    @property
    def cpu_quota_us(self) -> int:
        """CFS quota per ``cpu_period_us`` implementing ``cpu_limit`` (or ``cpu_count``)."""
        return self._cpu_quota_us()

    def _cpu_quota_us(self) -> int:
        cpus = self.cpu_limit if self.cpu_limit is not None else self.cpu_count
        return max(MIN_CPU_QUOTA_US, round(cpus * self.cpu_period_us))

    @functools.cached_property
    def exec_file_name(self) -> str:
        """The jailer's name for the exec file: the basename of its resolved path.

        Resolved once per config object (again if ``exec_file`` is reassigned): the jail of
        one VM keeps the name it started with even if the symlink is re-pointed (an upgrade)
        while it runs. ``VmConfig.jailer_config()`` hands out fresh objects.
        """
        return exec_file_name(self.exec_file)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "exec_file":
            self.__dict__.pop("exec_file_name", None)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy; one given another ``exec_file`` resolves its name anew (the cached name is
        the old file's: the jail, socket and pid paths would all point at the wrong place)."""
        copy = super().model_copy(update=update, deep=deep)
        if update is not None and "exec_file" in update:
            copy.__dict__.pop("exec_file_name", None)
        return copy

    @property
    def jail_dir(self) -> Path:
        """``<chroot_base>/<exec name>/<id>``: everything the jailer makes for this VM."""
        return self.chroot_base_dir / self.exec_file_name / self.jailer_id

    @property
    def chroot_dir(self) -> Path:
        """The VMM's ``/`` on the host: ``<jail_dir>/root``."""
        return self.jail_dir / "root"

    @property
    def api_socket_path(self) -> Path:
        """Host path of the API socket (inside ``root/``, unlike the spec says)."""
        return self.chroot_dir / str(self.api_sock).lstrip("/")


class VmConfig(_Model):
    """One microVM (spec: VmConfig). ``jailer`` overrides what is derived for the jail."""

    vm_id: str = "default"
    vcpu_count: int = Field(default=1, ge=1, le=MAX_VCPUS)
    memory_mb: int = Field(default=512, ge=MIN_MEMORY_MIB, le=MAX_MEMORY_MIB)
    kernel_path: str = "/path/to/vmlinux.bin"
    #: ``None`` boots without a root drive (e.g. the probe guest).
    rootfs_path: str | None = "/path/to/rootfs.ext4"
    enable_networking: bool = False
    #: With networking: the tap's address inside the VM's namespace (the guest's gateway);
    #: the guest gets the next address, passed as ``ip=`` on the kernel command line unless
    #: ``boot_args`` already has one.
    tap_host_cidr: str = "172.30.0.1/30"
    #: Opt-in route beyond the namespace: a veth pair to the host on this IPv4 /30 (host end
    #: first address), removed at stop. NAT/forwarding on the host stay the operator's choice.
    uplink_subnet: str | None = None

    boot_args: str = DEFAULT_BOOT_ARGS
    rootfs_read_only: bool = False
    #: Refuse to run unjailed. ``None``: the ``IRONCLAW_REQUIRE_SANDBOX`` environment variable.
    require_sandbox: bool | None = None
    #: Memory limit head-room above ``memory_mb`` when ``jailer.memory_limit_mb`` is not set.
    memory_headroom_mb: int = Field(
        default=DEFAULT_MEMORY_HEADROOM_MIB, ge=VMM_OVERHEAD_MIB, le=MAX_MEMORY_HEADROOM_MIB
    )
    #: vsock device: guest CID (>= 3) and the jail-relative host socket path.
    vsock_guest_cid: int | None = Field(default=None, ge=3, le=2**32 - 2)
    vsock_uds_path: JailPath = PurePosixPath("/run/vsock.sock")
    #: Confine ``kernel_path``/``rootfs_path`` to these directories after resolving symlinks
    #: (becomes ``jailer.image_dirs`` unless that is set). ``None``: ``IRONCLAW_IMAGE_DIRS``.
    image_dirs: ImageDirs | None = None
    jailer: JailerConfig | None = None
    #: Firecracker token buckets on the root drive and the network interface (rx/tx).
    drive_rate_limit: RateLimit | None = None
    net_rx_rate_limit: RateLimit | None = None
    net_tx_rate_limit: RateLimit | None = None
    #: ironclaw's own limit on the host-side vsock connections (see ``vm.vsock``).
    vsock_rate_limit: VsockRateLimit | None = None
    #: Firecracker ``machine-config.track_dirty_pages`` (v1.0+): KVM logs the pages the guest
    #: writes, so ``vm.snapshot(diff=True)`` can write only those. Costs some guest write
    #: speed; needed for Diff snapshots before v1.14 (which can also approximate without it).
    track_dirty_pages: bool = False
    #: Bytes of console output (serial + firecracker's log) kept on the host for this VM,
    #: ``console.log`` and ``console.log.1`` together; older output is dropped.
    console_limit_bytes: int = Field(
        default=DEFAULT_CONSOLE_LIMIT_BYTES, ge=MIN_CONSOLE_LIMIT_BYTES, le=MAX_CONSOLE_LIMIT_BYTES
    )

    _check_id = field_validator("vm_id")(lambda v: check_id(v, "vm_id"))

    @field_validator("boot_args")
    @classmethod
    def _args(cls, v: str) -> str:
        return cls._check_args(v)

    @staticmethod
    def _check_args(v: str) -> str:
        bad = next((c for c in v if not " " <= c <= "~"), None)
        if bad is not None:
            raise ValueError(
                f"boot_args contains {bad!r}: the kernel command line must be printable ASCII "
                "on one line (Firecracker refuses anything else)"
            )
        if len(v) > MAX_BOOT_ARGS:
            raise ValueError(f"boot_args is {len(v)} characters, over the {MAX_BOOT_ARGS} limit")
        if v.count('"') % 2:
            # The kernel would read everything after the open quote, including the ``ip=``
            # added for networking, as one value.
            raise ValueError(f"boot_args {v!r} has an unclosed double quote: close it")
        return v

    @field_validator("vsock_uds_path")
    @classmethod
    def _vsock_path(cls, v: PurePosixPath) -> PurePosixPath:
        return _jail_path(v, "vsock_uds_path")

    @field_validator("kernel_path", "rootfs_path")
    @classmethod
    def _image_paths(cls, v: str | None, info: ValidationInfo) -> str | None:
        return None if v is None else host_path(v, str(info.field_name))

    @field_validator("image_dirs")
    @classmethod
    def _dirs(cls, v: tuple[Path, ...] | None) -> tuple[Path, ...] | None:
        return _image_dirs(v, "image_dirs")

    @field_validator("tap_host_cidr")
    @classmethod
    def _tap_cidr(cls, v: str) -> str:
        return cls._check_tap_cidr(v)

    @staticmethod
    def _check_tap_cidr(v: str) -> str:
        try:
            iface = ipaddress.IPv4Interface(v)
        except ValueError:
            raise ValueError(f"tap_host_cidr {v!r} is not an IPv4 address/prefix") from None
        if iface.network.prefixlen > 30 or iface.ip in (
            iface.network.network_address,
            iface.network.broadcast_address,
        ):
            raise ValueError(f"tap_host_cidr {v!r} needs a host address in a /30 or larger")
        if iface.ip + 1 == iface.network.broadcast_address:
            raise ValueError(
                f"tap_host_cidr {v!r} leaves no address for the guest, which gets the next "
                f"one ({iface.ip + 1}, the broadcast address): use "
                f"{iface.network.network_address + 1}/{iface.network.prefixlen}"
            )
        _reject_special_network(iface.network, "tap_host_cidr", v)
        return v

    @field_validator("uplink_subnet")
    @classmethod
    def _uplink(cls, v: str | None) -> str | None:
        return cls._check_uplink(v)

    @staticmethod
    def _check_uplink(v: str | None) -> str | None:
        if v is None:
            return None
        try:
            net = ipaddress.IPv4Network(v)
        except ValueError:
            raise ValueError(
                f"uplink_subnet {v!r} is not an IPv4 network such as 10.200.0.0/30"
            ) from None
        if net.prefixlen != 30:
            raise ValueError(f"uplink_subnet {v!r} must be a /30")
        _reject_special_network(net, "uplink_subnet", v)
        if net.is_link_local:
            raise ValueError(
                f"uplink_subnet {v!r} is link-local (169.254.0.0/16), which hosts use for "
                "metadata services and autoconfiguration: use a private range such as 10.x"
            )
        return v

    def guest_ip_arg(self) -> str:
        """Kernel ``ip=`` argument configuring the guest's ``eth0`` behind the tap."""
        iface = ipaddress.IPv4Interface(self.tap_host_cidr)
        guest = iface.ip + 1
        return f"ip={guest}::{iface.ip}:{iface.network.netmask}::eth0:off"

    def kernel_cmdline(self) -> str:
        """The command line the guest kernel boots with: ``boot_args``, plus
        :meth:`guest_ip_arg` when networking is on and ``boot_args`` sets no ``ip=`` itself."""
        if self.enable_networking and not has_param(self.boot_args, "ip"):
            return add_param(self.boot_args, self.guest_ip_arg())
        return self.boot_args

    @model_validator(mode="after")
    def _cmdline_fits(self) -> VmConfig:
        return self._check_cmdline_fits()

    def _check_cmdline_fits(self) -> VmConfig:
        devices = sum((self.rootfs_path is not None, self.enable_networking,
                       self.vsock_guest_cid is not None))  # fmt: skip
        root = len(FIRECRACKER_ROOT_ARG) if self.rootfs_path is not None else 0
        size = len(self.kernel_cmdline()) + root + devices * len(FIRECRACKER_DEVICE_ARG)
        if size > MAX_BOOT_ARGS:
            ip = self.kernel_cmdline() != self.boot_args
            added = "the guest's ip= argument and " if ip else ""
            raise ValueError(
                f"boot_args with {added}what Firecracker appends (root=, one "
                f"virtio_mmio.device= per device) is up to {size} characters, over the "
                f"{MAX_BOOT_ARGS} a Linux guest reads (it would lose its devices): shorten "
                "boot_args"
            )
        return self

    @model_validator(mode="after")
    def _uplink_apart_from_tap(self) -> VmConfig:
        return self._check_uplink_apart_from_tap()

    def _check_uplink_apart_from_tap(self) -> VmConfig:
        if self.uplink_subnet is not None:
            tap = ipaddress.IPv4Interface(self.tap_host_cidr).network
            if tap.overlaps(ipaddress.IPv4Network(self.uplink_subnet)):
                raise ValueError(
                    f"uplink_subnet {self.uplink_subnet} overlaps tap_host_cidr "
                    f"{self.tap_host_cidr}: the namespace could not route between them; "
                    "pick another /30"
                )
        return self

    @model_validator(mode="after")
    def _memory_fits(self) -> VmConfig:
        return self._check_memory_fits()

    def _check_memory_fits(self) -> VmConfig:
        if self.jailer is not None and "memory_limit_mb" in self.jailer.model_fields_set:
            minimum = self.memory_mb + VMM_OVERHEAD_MIB
            if self.jailer.memory_limit_mb < minimum:
                raise ValueError(
                    f"jailer.memory_limit_mb={self.jailer.memory_limit_mb} is below guest memory "
                    f"({self.memory_mb} MiB) + VMM overhead ({VMM_OVERHEAD_MIB} MiB): "
                    f"set it to at least {minimum} or leave it unset to derive it"
                )
        return self

    def sandbox_required(self) -> bool:
        if self.require_sandbox is not None:
            return self.require_sandbox
        return os.environ.get("IRONCLAW_REQUIRE_SANDBOX", "").strip().lower() in (
            "1",
            "true",
            "yes",
            "on",
        )

    def jailer_config(self) -> JailerConfig:
        """The ``JailerConfig`` for this VM: ``jailer`` with id, vCPUs and memory filled in."""
        base = self.jailer or JailerConfig()
        updates: dict[str, object] = {}
        if "jailer_id" not in base.model_fields_set:
            updates["jailer_id"] = self.vm_id
        if "cpu_count" not in base.model_fields_set:
            updates["cpu_count"] = self.vcpu_count
        if "memory_limit_mb" not in base.model_fields_set:
            updates["memory_limit_mb"] = self.memory_mb + self.memory_headroom_mb
        if "image_dirs" not in base.model_fields_set and self.image_dirs is not None:
            updates["image_dirs"] = self.image_dirs
        merged = base.model_copy(update=updates)
        merged.__dict__.pop("exec_file_name", None)  # resolve anew: the binary may have changed
        # model_copy keeps fields_set; remember that these were derived, not chosen.
        return merged


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
