"""For a non-root user: what runs here now (development mode) and what jailed mode needs.

Added to the static checks when doctor does not run as root: the jailed checks then fail for
lack of privilege, which says little about what root would find, so these two rows say what
works (unjailed VMs, and where their files go) and exactly what jailed VMs would still need.
"""

from __future__ import annotations

from ..paths import default_run_dir, default_state_dir, writable_ancestor
from .checks import HostPaths
from .report import Check, Status

__all__ = ["check_development_mode", "check_jailed_mode"]

#: Checks whose outcome for a non-root user says nothing about root's (permission-bound).
_ROOT_BOUND = ("root", "cgroup", "chroot base", "network namespaces")


def check_development_mode(checks: list[Check], host: HostPaths) -> Check:
    """Can this (non-root) user run unjailed VMs: /dev/kvm, firecracker, run and state dirs?"""
    name = "development mode"
    missing = [
        f"{c.name}: {c.fix}"
        for c in checks
        if c.name in ("kvm", "firecracker") and c.status is Status.FAIL
    ]
    dirs = {
        "RUN": ("run dir", default_run_dir(create=False)),
        "STATE": ("state dir", default_state_dir(create=False)),
    }
    for env, (what, path) in dirs.items():
        if writable_ancestor(path) is None:
            missing.append(
                f"{what} {path} is not writable: set IRONCLAW_{env}_DIR to a directory you own"
            )
    uid = host.geteuid()
    if missing:
        return Check(name, Status.FAIL, f"unjailed VMs cannot run as uid {uid}", "; ".join(missing))
    where = ", ".join(f"{what} {path}" for what, path in dirs.values())
    value = f"unjailed VMs (insecure: no sandbox) can run as uid {uid}; {where}"
    return Check(name, Status.PASS, value)


def check_jailed_mode(checks: list[Check], host: HostPaths) -> Check:
    """For a non-root user: exactly what jailed mode still needs."""
    other = [
        c
        for c in checks
        if c.status is Status.FAIL
        and c.name not in ("development mode", "jailed mode")
        and not c.name.startswith(_ROOT_BOUND)
    ]
    needs = [
        f"root: the jailer must be started as root (we are uid {host.geteuid()}); it then "
        "drops each VM to a uid/gid of its own",
        *(f"{c.name}: {c.fix}" for c in other),
    ]
    fix = (
        "; ".join(needs) + "; then run `sudo ironclaw doctor` to check cgroups, the chroot "
        "base and network namespaces as root"
    )
    value = "not available: needs " + ", ".join(["root", *(c.name for c in other)])
    return Check("jailed mode", Status.FAIL, value, fix, details={"needs": needs})
