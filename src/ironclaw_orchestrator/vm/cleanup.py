"""Making and removing a jailed VM's host resources: the functions stop *and* gc use.

Each ``remove_*`` is idempotent (a resource already gone is fine) and touches only the
thing named. :func:`claim_jail_dir` makes the jail directory atomically, with our marker
inside, so no crash can leave an unmarked jail that blocks its id; :func:`claim_netns`
claims the namespace name by an exclusive create, without a host lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import names, procfs
from .. import pidfd as pidfds
from ..errors import ConfigError
from ..fsflags import spread_subdirs, spread_subdirs_once
from ..safefs import rename_noreplace
from ..safetree import RemovalBudget, rmtree_nofollow
from .rundir import CONSOLE_LOG as RUN_DIR_CONSOLE_LOG

if TYPE_CHECKING:
    from .cgroups.fs import CgroupFs

__all__ = [
    "CLAIM_PREFIX",
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


# --------------------------------------------------------------------------- jail directory


def claim_jail_dir(jail: Path, vm_id: str) -> Path:
    """Create ``jail`` (``<base>/<exec>/<id>``) with our marker in it, atomically.

    It is built under a temporary name and renamed into place without replacing anything:
    it appears complete or not at all. Raises ``ConfigError`` if the id's jail exists.
    """
    parent = str(jail.parent)
    tmp = f"{parent}/{CLAIM_PREFIX}{vm_id}-{secrets.token_hex(4)}"
    spread_subdirs_once(parent)  # jails are unrelated trees: spread them (ext4 Orlov)
    try:
        os.mkdir(tmp, 0o700)
    except FileNotFoundError:  # the first VM of this exec file under this base
        with contextlib.suppress(FileExistsError):
            os.mkdir(parent, 0o755)
            spread_subdirs(parent)
        os.mkdir(tmp, 0o700)
    try:
        _write_marker(f"{tmp}/{names.JAIL_MARKER}", vm_id)
        rename_noreplace(tmp, jail)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            rmtree_nofollow(Path(tmp))
        if isinstance(exc, FileExistsError):
            raise ConfigError(
                f"VM {vm_id}: jail directory {jail} already exists: the id is in use, or a "
                "crashed run left it behind (`ironclaw gc` removes leftovers)"
            ) from None
        raise
    return jail


def _write_marker(path: str, vm_id: str) -> None:
    data = json.dumps({"vm_id": vm_id, "orchestrator_pid": os.getpid()}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


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


def remove_jail_tree(jail: Path, budget: RemovalBudget | None = None) -> None:
    """Remove the jail directory (no symlink followed); its VMM must be gone already.

    Our marker goes last: a removal cut short (a crash, or ``budget`` spent: ``OverBudget``)
    leaves a jail gc still knows as ours.
    """
    rmtree_nofollow(jail, last=names.JAIL_MARKER, budget=budget)


def remove_run_dir(run_dir: Path, budget: RemovalBudget | None = None) -> None:
    """Remove the VM's run directory: usually just its console log, unlinked without a
    listing; whatever else is there (a rotated log, a socket) is found by one."""
    rmtree_nofollow(run_dir, expected=(RUN_DIR_CONSOLE_LOG,), budget=budget)


# --------------------------------------------------------------------------- network


def claim_netns(vm_id: str) -> str:
    """Claim the VM's namespace name ``ironclaw-<id>``; return it. Bind it only after recording.

    The claim is the exclusive create of the empty file ``/run/netns/<name>`` (which the
    namespace is later bound on): atomic across every process on the host, so no host lock
    is taken and none is held while the kernel makes the namespace. Why that is safe:

    * two orchestrators, one id: exactly one create succeeds; the other gets
      ``ConfigError`` and has recorded nothing, so its rollback never deletes the winner's;
    * a record names the namespace only after the claim, so it never names someone
      else's, and nothing between claim and bind unlinks the file (the name stays ours);
    * a crash after the claim leaves a file (or a namespace) named after the id, recorded or
      not; gc removes both kinds by name like a jail claim, after the id's directories (made
      just before) have aged, and never while any process is inside.
    """
    from . import netns as ns

    name = names.netns_name(vm_id)
    try:
        ns.claim_netns_name(name)
    except FileExistsError:
        raise ConfigError(
            f"VM {vm_id}: network namespace {name} already exists: the id is in use "
            "(perhaps by an orchestrator with another state directory), or a crash left "
            "it behind (`ironclaw gc` removes leftovers)"
        ) from None
    return name


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
