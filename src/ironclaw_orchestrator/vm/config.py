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

import ipaddress
import os
from pathlib import Path, PurePosixPath

from pydantic import Field, ValidationInfo, field_validator, model_validator

from .cmdline import add_param, has_param
from .config_rules import (
    DEFAULT_API_SOCK,
    DEFAULT_BOOT_ARGS,
    DEFAULT_CHROOT_BASE,
    DEFAULT_CONSOLE_LIMIT_BYTES,
    DEFAULT_EXEC_FILE,
    DEFAULT_JAIL_GID,
    DEFAULT_JAIL_UID,
    DEFAULT_JAILER_BINARY,
    DEFAULT_MEMORY_HEADROOM_MIB,
    DEFAULT_PARENT_CGROUP_NAME,
    FIRECRACKER_DEVICE_ARG,
    FIRECRACKER_ROOT_ARG,
    MAX_BOOT_ARGS,
    MAX_CONSOLE_LIMIT_BYTES,
    MAX_MEMORY_HEADROOM_MIB,
    MAX_MEMORY_LIMIT_MIB,
    MAX_MEMORY_MIB,
    MAX_NAME_BYTES,
    MAX_NO_FILE,
    MAX_PATH_BYTES,
    MAX_PIDS,
    MAX_SOCKET_PATH_BYTES,
    MAX_U63,
    MAX_VCPUS,
    MIN_CONSOLE_LIMIT_BYTES,
    MIN_CPU_QUOTA_US,
    MIN_MEMORY_MIB,
    VMM_OVERHEAD_MIB,
    HostPath,
    ImageDirs,
    JailPath,
    _image_dirs,
    _jail_path,
    _Model,
    _reject_special_network,
    check_id,
    config_error,
    host_path,
)
from .jailer_config import JailerConfig
from .ratelimit import RateLimit, VsockRateLimit

#: The constants and rules live in :mod:`.config_rules`, ``JailerConfig`` in
#: :mod:`.jailer_config`; all stay importable from here.
__all__ = [
    "DEFAULT_API_SOCK",
    "DEFAULT_BOOT_ARGS",
    "DEFAULT_CHROOT_BASE",
    "DEFAULT_CONSOLE_LIMIT_BYTES",
    "DEFAULT_EXEC_FILE",
    "DEFAULT_JAILER_BINARY",
    "DEFAULT_JAIL_GID",
    "DEFAULT_JAIL_UID",
    "DEFAULT_MEMORY_HEADROOM_MIB",
    "DEFAULT_PARENT_CGROUP_NAME",
    "FIRECRACKER_DEVICE_ARG",
    "FIRECRACKER_ROOT_ARG",
    "MAX_BOOT_ARGS",
    "MAX_CONSOLE_LIMIT_BYTES",
    "MAX_MEMORY_HEADROOM_MIB",
    "MAX_MEMORY_LIMIT_MIB",
    "MAX_MEMORY_MIB",
    "MAX_NAME_BYTES",
    "MAX_NO_FILE",
    "MAX_PATH_BYTES",
    "MAX_PIDS",
    "MAX_SOCKET_PATH_BYTES",
    "MAX_U63",
    "MAX_VCPUS",
    "MIN_CONSOLE_LIMIT_BYTES",
    "MIN_CPU_QUOTA_US",
    "MIN_MEMORY_MIB",
    "VMM_OVERHEAD_MIB",
    "HostPath",
    "ImageDirs",
    "JailPath",
    "JailerConfig",
    "VmConfig",
    "check_id",
    "config_error",
    "host_path",
]


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
        base = self.jailer or _DEFAULT_JAILER  # only copied, never changed
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
        merged._forget_derived("exec_file")  # resolve anew: the binary may have changed
        # model_copy keeps fields_set; remember that these were derived, not chosen.
        return merged


#: ``JailerConfig()``, validated once: every VM without a ``jailer`` table starts from a copy.
_DEFAULT_JAILER = JailerConfig()
