"""Making and removing a jailed VM's host resources: the functions stop *and* gc use.

Each ``remove_*`` is idempotent (a resource already gone is fine) and touches only the
thing named. :func:`claim_jail_dir` makes the jail directory atomically, with our marker
inside, so no crash can leave an unmarked jail that blocks its id.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import names, procfs
from .. import pidfd as pidfds
from ..errors import ConfigError
from ..safefs import rename_noreplace, rmtree_nofollow
from .cgroups.lock import DEFAULT_LOCK_PATH, HostLock

if TYPE_CHECKING:
    from .cgroups.fs import CgroupFs

__all__ = [
    "CLAIM_PREFIX",
    "NETNS_LOCK_PATH",
    "claim_jail_dir",
    "claim_netns",
    "jail_processes",
    "kill_jail_processes",
    "remove_cgroups",
    "remove_jail_dir",
    "remove_jail_tree",
    "remove_network",
    "remove_run_dir",
]

#: A jail directory being made: ``<base>/<exec>/.claim-<id>-<hex>`` (renamed to ``<id>``).
CLAIM_PREFIX = ".claim-"
#: Serialises "is the namespace free? then create it" across orchestrators on one host.
NETNS_LOCK_PATH = DEFAULT_LOCK_PATH.with_name("netns.lock")


# --------------------------------------------------------------------------- jail directory


def claim_jail_dir(jail: Path, vm_id: str) -> Path:
    """Create ``jail`` (``<base>/<exec>/<id>``) with our marker in it, atomically.

    It is built under a temporary name and renamed into place without replacing anything:
    it appears complete or not at all. Raises ``ConfigError`` if the id's jail exists.
    """
    parent = jail.parent
    parent.mkdir(mode=0o755, exist_ok=True)
    tmp = parent / f"{CLAIM_PREFIX}{vm_id}-{secrets.token_hex(4)}"
    os.mkdir(tmp, 0o700)
    try:
        (tmp / names.JAIL_MARKER).write_text(
            json.dumps({"vm_id": vm_id, "orchestrator_pid": os.getpid()}) + "\n"
        )
        rename_noreplace(tmp, jail)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            rmtree_nofollow(tmp)
        if isinstance(exc, FileExistsError):
            raise ConfigError(
                f"VM {vm_id}: jail directory {jail} already exists: the id is in use, or a "
                "crashed run left it behind (`ironclaw gc` removes leftovers)"
            ) from None
        raise
    return jail


def claim_id_of(name: str) -> str | None:
    """The VM id of a temporary claim directory's name, or ``None``."""
    if not name.startswith(CLAIM_PREFIX):
        return None
    vm_id = name[len(CLAIM_PREFIX) :].rpartition("-")[0]
    return vm_id if names.is_valid_id(vm_id) else None


def jail_processes(jail: Path, proc: Path = procfs.PROC) -> list[int]:
    """Processes with their root or cwd in ``jail`` (a VMM, whoever started it)."""
    return procfs.pids_using_dir(jail, proc, fds=False)


def kill_jail_processes(jail: Path, timeout_s: float = 5.0, proc: Path = procfs.PROC) -> list[int]:
    """SIGKILL (through pidfds) and reap every process whose root or cwd is in ``jail``."""
    killed = []
    for pid in jail_processes(jail, proc):
        start = procfs.read_start_time(pid, proc)
        if start is not None and pidfds.kill_and_reap(pid, start, timeout_s, proc) == "killed":
            killed.append(pid)
    return killed


def remove_jail_dir(jail: Path) -> None:
    """Kill what still runs inside the jail, then remove it (no symlink followed)."""
    if os.path.lexists(jail):
        kill_jail_processes(jail)
    remove_jail_tree(jail)


def remove_jail_tree(jail: Path) -> None:
    """Remove the jail directory (no symlink followed); its VMM must be gone already."""
    rmtree_nofollow(jail)


def remove_run_dir(run_dir: Path) -> None:
    rmtree_nofollow(run_dir)


# --------------------------------------------------------------------------- network


@contextlib.contextmanager
def claim_netns(vm_id: str, lock_path: Path | None = None) -> Iterator[str]:
    """Hold the host's netns lock while the VM's namespace name is free; yield the name.

    Raises ``ConfigError`` if ``ironclaw-<id>`` exists (another orchestrator's VM with this
    id): that namespace is never recorded as ours, so our rollback cannot delete it.
    """
    from . import netns as ns

    name = names.netns_name(vm_id)
    with HostLock(lock_path or NETNS_LOCK_PATH):
        if os.path.lexists(ns.netns_path(name)):
            raise ConfigError(
                f"VM {vm_id}: network namespace {name} already exists: the id is in use "
                "(perhaps by an orchestrator with another state directory), or a crash left "
                "it behind (`ironclaw gc` removes leftovers)"
            )
        yield name


def remove_network(netns: str, vm_id: str, tap: str | None, uplink: bool) -> None:
    """Remove the VM's uplink, tap and network namespace (each if present)."""
    from . import netns as ns

    if uplink:
        ns.remove_uplink(netns, vm_id)
    if tap is not None:
        ns.remove_tap(netns, tap)
    ns.remove_netns(netns)


# --------------------------------------------------------------------------- cgroups


def remove_cgroups(data: dict[str, Any], fs: CgroupFs | None = None) -> None:
    """Remove a VM's cgroups from their recorded form (``VmCgroups.to_dict()``)."""
    from .cgroups import VmCgroups

    VmCgroups.from_dict(data, fs=fs).remove()
