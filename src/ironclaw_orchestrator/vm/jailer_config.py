"""``JailerConfig``: how to jail one Firecracker process (spec: JailerConfig).

Pure validation, no I/O, except that the exec file's name is resolved (symlinks followed)
once per config object: the jail's host paths (``jail_dir``, ``chroot_dir``,
``api_socket_path``) derive from it and are computed once per object too, since every step
of a start asks for them.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Self

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ..names import real_path
from .config_rules import (
    DEFAULT_API_SOCK,
    DEFAULT_CHROOT_BASE,
    DEFAULT_EXEC_FILE,
    DEFAULT_JAIL_GID,
    DEFAULT_JAIL_UID,
    DEFAULT_JAILER_BINARY,
    MAX_MEMORY_LIMIT_MIB,
    MAX_NO_FILE,
    MAX_PIDS,
    MAX_U63,
    MAX_VCPUS,
    MIN_CPU_QUOTA_US,
    MIN_MEMORY_MIB,
    HostPath,
    ImageDirs,
    JailPath,
    _cpu_list,
    _image_dirs,
    _jail_path,
    _Model,
    check_id,
    host_path,
)

__all__ = ["JailerConfig"]


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
    #: With ``netns`` unset: give the VM a private network namespace of its own, created
    #: before the jailer runs: nameless, or ``ironclaw-<id>`` with a tap, an uplink or an LSM
    #: profile (deleted at stop; see :mod:`.netns.pool`). ``False`` leaves the VMM in the
    #: host's namespace (not recommended).
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
    def exec_file_resolved(self) -> Path:
        """``exec_file`` with every symlink resolved: what the jailer is handed, so the
        jail it builds is named as ours is even if a symlink is re-pointed (an upgrade)
        between our check and its start (the jailer resolves ``--exec-file`` itself).

        Resolved once per config object (again if ``exec_file`` is reassigned).
        """
        return Path(real_path(self.exec_file))

    @functools.cached_property
    def exec_file_name(self) -> str:
        """The jailer's name for the exec file: the basename of its resolved path.

        Resolved once per config object (again if ``exec_file`` is reassigned): the jail of
        one VM keeps the name it started with even if the symlink is re-pointed (an upgrade)
        while it runs. ``VmConfig.jailer_config()`` hands out fresh objects.
        """
        return self.exec_file_resolved.name

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        self._forget_derived(name)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy; one given another ``exec_file`` resolves its name anew (the cached name is
        the old file's: the jail, socket and pid paths would all point at the wrong place),
        and one given another id, chroot base or socket path derives its paths anew."""
        copy = super().model_copy(update=update, deep=deep)
        for name in update or ():
            copy._forget_derived(name)
        return copy

    def with_exec_file(self, exec_file: Path) -> Self:
        """A copy whose ``exec_file`` is ``exec_file``, the binary found for a start.

        Its name is resolved (and its jail paths derived) anew, except in a copy of an object
        that came from ``with_exec_file`` for the same file: that one keeps them, so a start
        resolves the name once (``check_vm_inputs`` makes the first copy and
        ``start_firecracker`` hands it to ``start_with_jailer``), and the jail keeps the
        name its paths were checked with. ``VmConfig.jailer_config()`` never carries it over.
        """
        if self.__dict__.get(_FOR_START) == exec_file:
            return self.model_copy()
        copy = self.model_copy(update={"exec_file": exec_file})
        # Kept beside the cached name (copied with it, forgotten with it; not a field).
        copy.__dict__[_FOR_START] = exec_file
        return copy

    def _forget_derived(self, field: str) -> None:
        """Drop what was cached from ``field``'s old value."""
        if field in _PATH_INPUTS:
            for derived in _DERIVED_PATHS:
                self.__dict__.pop(derived, None)
            if field == "exec_file":
                self.__dict__.pop("exec_file_name", None)
                self.__dict__.pop("exec_file_resolved", None)
                self.__dict__.pop(_FOR_START, None)

    # The jail's host paths are asked for by every step of a start and a stop: derived once
    # per config object (pathlib joins cost microseconds each, and there were dozens per VM).

    @functools.cached_property
    def jail_dir(self) -> Path:
        """``<chroot_base>/<exec name>/<id>``: everything the jailer makes for this VM."""
        return self.chroot_base_dir / self.exec_file_name / self.jailer_id

    @functools.cached_property
    def chroot_dir(self) -> Path:
        """The VMM's ``/`` on the host: ``<jail_dir>/root``."""
        return self.jail_dir / "root"

    @functools.cached_property
    def api_socket_path(self) -> Path:
        """Host path of the API socket (inside ``root/``, unlike the spec says)."""
        return self.chroot_dir / str(self.api_sock).lstrip("/")


#: Fields the jail's host paths are derived from, and the cached paths themselves.
_PATH_INPUTS = frozenset({"chroot_base_dir", "exec_file", "jailer_id", "api_sock"})
_DERIVED_PATHS = ("jail_dir", "chroot_dir", "api_socket_path")
#: Set by ``with_exec_file``: the exec file the cached name was resolved from, for one start.
_FOR_START = "_exec_file_for_start"
