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
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import ConfigError

#: Ids the jailer accepts are a superset; we restrict to this so ids are safe everywhere
#: (paths, cgroup names, netns names, log lines).
ID_PATTERN = re.compile(r"^[A-Za-z0-9-]{1,64}$")
#: Linux ``sun_path`` holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
#: Firecracker's own limit on vCPUs.
MAX_VCPUS = 32
MIN_MEMORY_MIB = 128
#: What the VMM itself needs on top of guest memory (Firecracker publishes <= 5 MiB; the
#: jailer's copy of the exec file and page tables need a little more).
VMM_OVERHEAD_MIB = 16
#: Default head-room above guest memory when the memory limit is derived from ``VmConfig``.
DEFAULT_MEMORY_HEADROOM_MIB = 64
#: The unprivileged uid/gid the VMM runs as unless configured.
DEFAULT_JAIL_UID = 64_000
DEFAULT_JAIL_GID = 64_000
DEFAULT_BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off"
DEFAULT_JAILER_BINARY = Path("/usr/local/bin/jailer")
DEFAULT_EXEC_FILE = Path("/usr/local/bin/firecracker-v1.14.1")
DEFAULT_CHROOT_BASE = Path("/var/jail")
DEFAULT_API_SOCK = PurePosixPath("/run/firecracker.socket")
DEFAULT_PARENT_CGROUP_NAME = "ironclaw"


def check_id(value: str, what: str = "vm_id") -> str:
    if not ID_PATTERN.match(value):
        raise ValueError(
            f"{what} {value!r} is invalid: use 1 to 64 characters from A-Z, a-z, 0-9 and '-'"
        )
    return value


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


class _Model(BaseModel):
    """Base: unknown keys are errors, and bad values raise ``ConfigError`` (not pydantic's)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

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

    jailer_binary: Path = DEFAULT_JAILER_BINARY
    jailer_id: str = "ironclaw-vm"
    chroot_base_dir: Path = DEFAULT_CHROOT_BASE
    exec_file: Path = DEFAULT_EXEC_FILE
    cpu_count: int = Field(default=1, ge=1, le=MAX_VCPUS)
    memory_limit_mb: int = Field(default=256, ge=MIN_MEMORY_MIB)
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
    no_file: int | None = Field(default=2048, ge=16)
    fsize: int | None = Field(default=None, ge=1)
    #: Jail-relative path of the API socket.
    api_sock: PurePosixPath = DEFAULT_API_SOCK

    # Resource limits beyond cpu_count / memory_limit_mb (spec Phase 2).
    cpu_period_us: int = Field(default=100_000, ge=1_000, le=1_000_000)
    #: CPU time quota in CPUs, may be fractional (``0.5`` = half a CPU). Default: ``cpu_count``.
    cpu_limit: float | None = Field(default=None, ge=0.01, le=MAX_VCPUS)
    #: Relative CPU weight, 1..10000 (v2 ``cpu.weight``; v1 ``cpu.shares`` scaled).
    cpu_weight: int | None = Field(default=None, ge=1, le=10_000)
    #: v2 ``memory.high`` (throttle before the hard limit); v1 ``memory.soft_limit_in_bytes``.
    memory_high_mb: int | None = Field(default=None, ge=1)
    #: Pin the VMM's threads, e.g. ``"0-1"``; ``cpuset_mems`` defaults to the parent's nodes.
    cpuset_cpus: str | None = None
    cpuset_mems: str | None = None
    pids_max: int | None = Field(default=None, ge=1)
    #: Disk throttling for the device holding the VM's disks (v2 ``io.max``, v1 ``blkio``).
    io_read_bps: int | None = Field(default=None, ge=1)
    io_write_bps: int | None = Field(default=None, ge=1)
    io_read_iops: int | None = Field(default=None, ge=1)
    io_write_iops: int | None = Field(default=None, ge=1)

    _check_id = field_validator("jailer_id")(lambda v: check_id(v, "jailer_id"))

    @field_validator("cpuset_cpus", "cpuset_mems")
    @classmethod
    def _lists(cls, v: str | None, info: object) -> str | None:
        return _cpu_list(v, getattr(info, "field_name", "cpuset"))

    @field_validator("api_sock")
    @classmethod
    def _abs_sock(cls, v: PurePosixPath) -> PurePosixPath:
        if not v.is_absolute() or ".." in v.parts:
            raise ValueError(f"api_sock {str(v)!r} must be an absolute jail-relative path")
        return v

    @field_validator("parent_cgroup")
    @classmethod
    def _rel_cgroup(cls, v: str | None) -> str | None:
        if v is None:
            return None
        parts = [p for p in v.strip("/").split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            raise ValueError(f"parent_cgroup {v!r} must be a relative path like 'ironclaw'")
        return "/".join(parts)

    @field_validator("netns")
    @classmethod
    def _netns_abs(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError(f"netns {v!r} must be an absolute path such as /run/netns/NAME")
        return v

    @property
    def cpu_quota_us(self) -> int:
        """CFS quota per ``cpu_period_us`` implementing ``cpu_limit`` (or ``cpu_count``)."""
        cpus = self.cpu_limit if self.cpu_limit is not None else self.cpu_count
        return max(1000, round(cpus * self.cpu_period_us))

    @property
    def exec_file_name(self) -> str:
        return self.exec_file.name

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
    memory_mb: int = Field(default=512, ge=MIN_MEMORY_MIB)
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
    memory_headroom_mb: int = Field(default=DEFAULT_MEMORY_HEADROOM_MIB, ge=VMM_OVERHEAD_MIB)
    #: vsock device: guest CID (>= 3) and the jail-relative host socket path.
    vsock_guest_cid: int | None = Field(default=None, ge=3, le=2**32 - 2)
    vsock_uds_path: PurePosixPath = PurePosixPath("/run/vsock.sock")
    jailer: JailerConfig | None = None

    _check_id = field_validator("vm_id")(lambda v: check_id(v, "vm_id"))

    @field_validator("boot_args")
    @classmethod
    def _args(cls, v: str) -> str:
        if "\n" in v or len(v) > 2048:
            raise ValueError("boot_args must be one line of at most 2048 characters")
        return v

    @field_validator("tap_host_cidr")
    @classmethod
    def _tap_cidr(cls, v: str) -> str:
        try:
            iface = ipaddress.IPv4Interface(v)
        except ValueError:
            raise ValueError(f"tap_host_cidr {v!r} is not an IPv4 address/prefix") from None
        if iface.network.prefixlen > 30 or iface.ip in (
            iface.network.network_address,
            iface.network.broadcast_address,
        ):
            raise ValueError(f"tap_host_cidr {v!r} needs a host address in a /30 or larger")
        return v

    @field_validator("uplink_subnet")
    @classmethod
    def _uplink(cls, v: str | None) -> str | None:
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
        return v

    def guest_ip_arg(self) -> str:
        """Kernel ``ip=`` argument configuring the guest's ``eth0`` behind the tap."""
        iface = ipaddress.IPv4Interface(self.tap_host_cidr)
        guest = iface.ip + 1
        return f"ip={guest}::{iface.ip}:{iface.network.netmask}::eth0:off"

    @model_validator(mode="after")
    def _memory_fits(self) -> VmConfig:
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
        merged = base.model_copy(update=updates)
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
