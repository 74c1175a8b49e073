"""cgroups for jailed Firecracker VMs: host layout, limits -> files, per-VM directories, stats.

Typical use::

    layout = detect_layout()
    version = choose_version(layout, cfg.cgroup_version, ["cpu", "memory", ...])
    settings = cgroup_settings(cfg, version, io_device)
    cgroups = VmCgroups.plan(layout, version, cfg.jailer_id, settings, cfg.parent_cgroup)
    cgroups.prepare()                       # creates + fills dirs; CgroupError before spawning
    argv += cgroups.jailer_args()           # --cgroup-version/--parent-cgroup/--cgroup ...
    ... spawn the jailer ...; cgroups.attach(vmm_pid)
    ... cgroups.stats(), cgroups.oom_kills() ...
    cgroups.remove()

The parent chain above the VM directories stays while this process lives (see
:mod:`.chains`); :func:`release_chains` removes it earlier, an ``atexit`` hook at exit.
"""

from .chains import release as release_chains
from .device import disk_device_for, whole_disk
from .fs import CgroupFs
from .layout import (
    CgroupLayout,
    choose_version,
    controller_names,
    detect_layout,
    parse_mountinfo,
    parse_proc_cgroup,
)
from .limits import CgroupSetting, cgroup_settings, cpu_shares, jailer_can_pass, jailer_cgroup_args
from .lock import DEFAULT_LOCK_PATH, HostLock
from .stats import CgroupStats, IoStat
from .tree import UNIFIED, VmCgroups
from .warmup import migration_coming, warm_migration_lock

__all__ = [
    "DEFAULT_LOCK_PATH",
    "UNIFIED",
    "CgroupFs",
    "CgroupLayout",
    "CgroupSetting",
    "CgroupStats",
    "HostLock",
    "IoStat",
    "VmCgroups",
    "cgroup_settings",
    "choose_version",
    "controller_names",
    "cpu_shares",
    "detect_layout",
    "disk_device_for",
    "jailer_can_pass",
    "jailer_cgroup_args",
    "migration_coming",
    "parse_mountinfo",
    "parse_proc_cgroup",
    "release_chains",
    "warm_migration_lock",
    "whole_disk",
]
