"""``JailerConfig`` limits -> the cgroup files and values that implement them (pure).

The list is in the order the files must be written (the jailer writes ``--cgroup`` arguments
in the order given): the CFS period before the quota, ``cpuset.cpus`` before ``cpuset.mems``.

``via_jailer`` tells whether the jailer (v1.0+) can take the setting as ``--cgroup FILE=VALUE``:
it splits the argument on ``=`` and needs exactly two parts, and splits the file name on ``.``
and needs exactly two parts (``controller.property``). So ``blkio.throttle.*`` (three dots) and
``io.max`` (its value holds ``=``) cannot go through the jailer: the orchestrator writes them
itself and attaches the VMM to those controllers' cgroups (:meth:`VmCgroups.attach`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ...errors import ConfigError
from ..config import JailerConfig

MIB = 1 << 20


@dataclass(frozen=True)
class CgroupSetting:
    """One value written into one cgroup file of the VM's cgroup."""

    controller: str
    file: str
    value: str
    via_jailer: bool

    @property
    def jailer_arg(self) -> str:
        """``FILE=VALUE`` for ``--cgroup`` (only meaningful when ``via_jailer``)."""
        return f"{self.file}={self.value}"

    def to_dict(self) -> dict[str, object]:
        return {
            "controller": self.controller,
            "file": self.file,
            "value": self.value,
            "via_jailer": self.via_jailer,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> CgroupSetting:
        return cls(
            controller=str(data["controller"]),
            file=str(data["file"]),
            value=str(data["value"]),
            via_jailer=bool(data["via_jailer"]),
        )


def jailer_can_pass(file: str, value: str) -> bool:
    """Whether the v1.0 jailer's ``--cgroup`` parser accepts ``FILE=VALUE``."""
    return len(f"{file}={value}".split("=")) == 2 and len(file.split(".")) == 2


def setting(controller: str, file: str, value: object) -> CgroupSetting:
    text = str(value)
    return CgroupSetting(controller, file, text, jailer_can_pass(file, text))


def cpu_shares(weight: int) -> int:
    """v2 ``cpu.weight`` (1..10000, default 100) -> v1 ``cpu.shares`` (default 1024, min 2)."""
    return max(2, weight * 1024 // 100)


def _io_limits(cfg: JailerConfig) -> dict[str, int]:
    pairs = {
        "rbps": cfg.io_read_bps,
        "wbps": cfg.io_write_bps,
        "riops": cfg.io_read_iops,
        "wiops": cfg.io_write_iops,
    }
    return {k: v for k, v in pairs.items() if v is not None}


def cgroup_settings(
    cfg: JailerConfig, version: Literal[1, 2], io_device: str | None
) -> list[CgroupSetting]:
    """Every cgroup file to write for ``cfg`` on cgroup ``version``, in write order.

    ``io_device`` (``"MAJ:MIN"`` of the disk holding the VM's drives, see
    :func:`disk_device_for`) is needed only when an ``io_*`` limit is set. When
    ``cpuset_cpus`` is set without ``cpuset_mems``, no ``cpuset.mems`` setting is produced
    here; :meth:`VmCgroups.prepare` adds the parent's value.
    """
    io = _io_limits(cfg)
    if io and io_device is None:
        raise ConfigError(
            f"io limits {', '.join(sorted(io))} need the block device holding the VM's disks: "
            "pass io_device='MAJ:MIN' (disk_device_for(rootfs_path)) or unset the io_* limits"
        )
    quota = cfg.cpu_quota_us
    memory = cfg.memory_limit_mb * MIB
    high = None if cfg.memory_high_mb is None else cfg.memory_high_mb * MIB
    out: list[CgroupSetting] = []
    if version == 1:
        out.append(setting("cpu", "cpu.cfs_period_us", cfg.cpu_period_us))
        out.append(setting("cpu", "cpu.cfs_quota_us", quota))
        if cfg.cpu_weight is not None:
            out.append(setting("cpu", "cpu.shares", cpu_shares(cfg.cpu_weight)))
        out.append(setting("memory", "memory.limit_in_bytes", memory))
        if high is not None:
            out.append(setting("memory", "memory.soft_limit_in_bytes", high))
        if cfg.cpuset_cpus is not None:
            out.append(setting("cpuset", "cpuset.cpus", cfg.cpuset_cpus))
        if cfg.cpuset_mems is not None:
            out.append(setting("cpuset", "cpuset.mems", cfg.cpuset_mems))
        if cfg.pids_max is not None:
            out.append(setting("pids", "pids.max", cfg.pids_max))
        files = {
            "rbps": "read_bps_device",
            "wbps": "write_bps_device",
            "riops": "read_iops_device",
            "wiops": "write_iops_device",
        }
        for key, limit in io.items():
            out.append(setting("blkio", f"blkio.throttle.{files[key]}", f"{io_device} {limit}"))
        return out
    out.append(setting("cpu", "cpu.max", f"{quota} {cfg.cpu_period_us}"))
    if cfg.cpu_weight is not None:
        out.append(setting("cpu", "cpu.weight", cfg.cpu_weight))
    out.append(setting("memory", "memory.max", memory))
    if high is not None:
        out.append(setting("memory", "memory.high", high))
    if cfg.cpuset_cpus is not None:
        out.append(setting("cpuset", "cpuset.cpus", cfg.cpuset_cpus))
    if cfg.cpuset_mems is not None:
        out.append(setting("cpuset", "cpuset.mems", cfg.cpuset_mems))
    if cfg.pids_max is not None:
        out.append(setting("pids", "pids.max", cfg.pids_max))
    if io:
        keys = " ".join(f"{k}={v}" for k, v in io.items())
        out.append(setting("io", "io.max", f"{io_device} {keys}"))
    return out


def via_jailer(settings: Sequence[CgroupSetting]) -> list[CgroupSetting]:
    """The settings passed to the jailer as ``--cgroup FILE=VALUE``, in write order (the
    one place that decides it; the others are written by the orchestrator alone)."""
    return [s for s in settings if s.via_jailer]


def jailer_cgroup_args(settings: Sequence[CgroupSetting]) -> list[str]:
    """``["--cgroup", "FILE=VALUE", ...]`` for the settings the jailer can take."""
    args: list[str] = []
    for s in via_jailer(settings):
        args += ["--cgroup", s.jailer_arg]
    return args
