"""``ironclaw doctor``: can this host run jailed microVMs? (library half; never prints).

:func:`run_checks` returns a :class:`DoctorReport`: one :class:`Check` per question, each with
a status (``pass`` / ``warn`` / ``fail``), the value found and a one-line fix. The host is
ready (:attr:`DoctorReport.ok`) when no check failed; warnings are things that only some VMs
need (optional cgroup controllers, ids longer than the socket budget allows, ...).

Static checks only read the host, except two probes that are undone at once: a uniquely named
``ironclaw-doctor-<random>`` directory is created and removed under the orchestrator's own
cgroup of each controller, and a temporary directory under the chroot base. Nothing else is
written; in particular no network namespace is created.

With ``live=True`` the built-in probe guest (:mod:`.vm.probe`) is booted jailed, exactly as
``start_firecracker`` boots a VM, and timed; ``live_unjailed=True`` also boots it without the
jailer (development mode). Every live VM is stopped and cleaned up, also when a step fails.

Every host path is injectable through :class:`HostPaths`, so tests can point the checks at
fake trees.

Layout: :mod:`.report` (Status, Check, DoctorReport), :mod:`.checks` (the static checks;
the host checks it shares with the launch path live in :mod:`ironclaw_orchestrator.vm.hostcheck`
and are only reported here), :mod:`.live` (the probe-guest boot), :mod:`.modes` (for a
non-root user: development mode now, and what jailed mode needs).
"""

from __future__ import annotations

import asyncio
import os

from ..names import ID_MAX_LENGTH as MAX_ID_LENGTH
from ..vm.config import JailerConfig
from .checks import (
    CGROUP_CONTROLLERS,
    REQUIRED_CONTROLLERS,
    HostPaths,
    check_binaries,
    check_cgroups,
    check_chroot_base_dir,
    check_kvm_device,
    check_netns,
    check_root,
    check_socket_budget_for,
    run_static_checks,
)
from .confinement import check_confinement
from .live import LIVE_STEP_TIMEOUT_S, run_live_check
from .modes import check_development_mode, check_jailed_mode
from .report import DOCTOR_ID_PREFIX, Check, DoctorReport, Status

__all__ = [
    "CGROUP_CONTROLLERS",
    "DOCTOR_ID_PREFIX",
    "LIVE_STEP_TIMEOUT_S",
    "MAX_ID_LENGTH",
    "REQUIRED_CONTROLLERS",
    "Check",
    "DoctorReport",
    "HostPaths",
    "Status",
    "check_binaries",
    "check_cgroups",
    "check_chroot_base_dir",
    "check_confinement",
    "check_development_mode",
    "check_jailed_mode",
    "check_kvm_device",
    "check_netns",
    "check_root",
    "check_socket_budget_for",
    "run_checks",
    "run_live_check",
    "run_static_checks",
]


async def run_checks(
    config: JailerConfig | None = None,
    *,
    live: bool = False,
    live_unjailed: bool = False,
    host: HostPaths | None = None,
) -> DoctorReport:
    """Run every static check, then (if asked) the live boot(s); never raises for a
    host problem, which becomes a failed :class:`Check` instead. Not as root, ``live``
    boots the probe unjailed (development mode), the only mode available."""
    config = config or JailerConfig()
    checks = await asyncio.to_thread(run_static_checks, config, host=host)
    if live and os.geteuid() != 0:  # the jailed boot cannot work: boot unjailed instead
        live_unjailed = True
    elif live:
        checks.append(await run_live_check(config, jailed=True))
    if live_unjailed:
        checks.append(await run_live_check(config, jailed=False))
    return DoctorReport(checks)
