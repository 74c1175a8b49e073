"""Why the kernel refused a cgroup write, in words: what failed, the value, how to fix it."""

from __future__ import annotations

import errno
from pathlib import Path

from ...errors import CgroupError
from .fs import CgroupFs, read_optional

__all__ = ["FIELD_OF", "errname", "write_error"]

#: Which ``JailerConfig`` field produces a cgroup file (for "how to fix" hints).
FIELD_OF = {
    "cpu.cfs_period_us": "cpu_period_us",
    "cpu.cfs_quota_us": "cpu_count / cpu_period_us",
    "cpu.max": "cpu_count / cpu_period_us",
    "cpu.shares": "cpu_weight",
    "cpu.weight": "cpu_weight",
    "memory.limit_in_bytes": "memory_limit_mb",
    "memory.max": "memory_limit_mb",
    "memory.soft_limit_in_bytes": "memory_high_mb",
    "memory.high": "memory_high_mb",
    "cpuset.cpus": "cpuset_cpus",
    "cpuset.mems": "cpuset_mems",
    "pids.max": "pids_max",
    "io.max": "io_read_bps / io_write_bps / io_read_iops / io_write_iops",
}


def errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def write_error(
    fs: CgroupFs, version: int, target: Path, value: str, controller: str, exc: OSError, what: str
) -> CgroupError:
    """The error for a refused write of ``value`` to ``target``: what, why and what to fix."""
    name = target.name
    parent_val = read_optional(fs, target.parent.parent / name)
    context = f" (the parent cgroup has {name} = {parent_val!r})" if parent_val else ""
    fld = FIELD_OF.get(name)
    fix = f"fix JailerConfig.{fld}" if fld else "fix the value"
    if exc.errno == errno.ENOENT:
        hint = (
            f"this kernel offers no {name} in {target.parent}: the {controller} "
            "controller is not enabled there or the kernel lacks the feature; unset the "
            "limit or enable the controller"
        )
    elif name == "cpuset.cpus":
        hint = f"{fix}: use CPUs that are online and allowed in the parent cpuset"
    elif name == "cpuset.mems":
        hint = f"{fix}: use NUMA nodes allowed in the parent cpuset"
    elif name in ("cpu.cfs_quota_us", "cpu.max", "cpu.cfs_period_us"):
        hint = (
            f"{fix}: a child's CPU quota may not exceed the parent's (cgroup v1), and the "
            "period must be 1000..1000000 us"
        )
    elif controller == "memory":
        hint = f"{fix}: the limit must be at least the memory already in use"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        hint = "run as root or use a cgroup subtree delegated to this user"
    else:
        hint = fix
    doing = f" while {what}" if what else ""
    return CgroupError(
        f"cgroup v{version} controller {controller}: the kernel rejected "
        f"{name}={value!r}{doing} in {target.parent} ({errname(exc)}: {exc.strerror})"
        f"{context}; {hint}",
        controller=controller,
        path=str(target),
        value=value,
    )
