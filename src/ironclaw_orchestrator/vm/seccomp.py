"""Seccomp: is the VMM actually filtered? (Firecracker installs its filters per thread.)

Firecracker applies its built-in seccomp filters (or the one given with ``--seccomp-filter``)
to each of its threads: the VMM and API threads at start-up, every vCPU thread as it is
created at ``InstanceStart``. ``Seccomp: 2`` in ``/proc/<pid>/task/<tid>/status`` means
"filter mode"; 0 means unfiltered, which only ``--no-seccomp`` should ever produce.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import ConfigError, SandboxRequiredError

#: Values of the ``Seccomp:`` line in ``/proc/<pid>/status``.
SECCOMP_DISABLED, SECCOMP_STRICT, SECCOMP_FILTER = 0, 1, 2
#: Where a custom filter is staged inside the jail (as the VMM sees it).
SECCOMP_FILTER_JAIL_PATH = PurePosixPath("/seccomp-filter.bpf")
#: Kernel's ``/proc/sys/kernel/seccomp/actions_avail`` exists when filter mode is built in.
ACTIONS_AVAIL = Path("/proc/sys/kernel/seccomp/actions_avail")
#: ``/proc/<pid>/task/<tid>/status`` is about 1.5 KiB; ``Seccomp:`` comes before its middle.
_STATUS_READ = 8192


@dataclass(frozen=True)
class SeccompStatus:
    """Seccomp mode of every thread of one process (``tid -> mode``)."""

    pid: int
    threads: dict[int, int]

    @property
    def filtered(self) -> bool:
        """Every thread runs under a seccomp filter (mode 2)."""
        return bool(self.threads) and all(m == SECCOMP_FILTER for m in self.threads.values())

    @property
    def mode(self) -> int | None:
        """The weakest mode among the threads (``None``: no thread could be read)."""
        return min(self.threads.values()) if self.threads else None

    @property
    def unfiltered_threads(self) -> list[int]:
        return sorted(t for t, m in self.threads.items() if m != SECCOMP_FILTER)

    def summary(self) -> str:
        if not self.threads:
            return "unknown"
        if self.filtered:
            return f"filter ({len(self.threads)} threads)"
        return f"NOT filtered: threads {self.unfiltered_threads} (of {len(self.threads)})"


def read_seccomp_status(pid: int, proc: Path = Path("/proc")) -> SeccompStatus:
    """Read the ``Seccomp:`` line of each thread of ``pid`` (threads that vanish are skipped).

    All /proc reading for this lives in this one function. It runs at every start (the
    vCPU threads install their filters at ``InstanceStart``), so it reads bytes with plain
    ``os`` calls: one directory listing and one read per thread.
    """
    threads: dict[int, int] = {}
    task_dir = f"{proc}/{pid}/task"
    try:
        tids = [int(name) for name in os.listdir(task_dir) if name.isdigit()]
    except OSError:
        return SeccompStatus(pid, {})
    for tid in tids:
        try:
            fd = os.open(f"{task_dir}/{tid}/status", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            data = b"\n" + os.read(fd, _STATUS_READ)  # so the first line matches too
        except OSError:
            continue
        finally:
            os.close(fd)
        at = data.find(b"\nSeccomp:")
        if at >= 0:
            end = data.find(b"\n", at + 1)
            threads[tid] = int(data[at + 9 : end if end >= 0 else len(data)])
    return SeccompStatus(pid, threads)


def check_filtered(status: SeccompStatus, vm_id: str) -> None:
    """Raise ``SandboxRequiredError`` unless every VMM thread runs under a seccomp filter."""
    if status.filtered:
        return
    raise SandboxRequiredError(
        f"VM {vm_id}: the VMM (pid {status.pid}) is not confined by seccomp: "
        f"{status.summary()}. Firecracker filters every thread unless --no-seccomp is given; "
        "check that the kernel has CONFIG_SECCOMP_FILTER (`ironclaw doctor`) and that "
        "no_seccomp is not set"
    )


def check_no_seccomp_allowed(no_seccomp: bool, sandbox_required: bool, vm_id: str) -> None:
    """``no_seccomp`` is a debugging aid: refuse it in production mode."""
    if no_seccomp and sandbox_required:
        raise ConfigError(
            f"VM {vm_id}: jailer.no_seccomp (--no-seccomp) is refused in production mode "
            "(require_sandbox / IRONCLAW_REQUIRE_SANDBOX=1): drop it, or use seccomp_filter "
            "with a filter of your own"
        )


def kernel_supports_filter(actions_avail: Path = ACTIONS_AVAIL) -> tuple[bool, str]:
    """Whether this kernel offers seccomp filter mode, and what it reports."""
    try:
        actions = actions_avail.read_text().split()
    except OSError:
        return False, f"{actions_avail} is missing (kernel without CONFIG_SECCOMP_FILTER)"
    return "kill_process" in actions or "kill_thread" in actions, " ".join(actions)
