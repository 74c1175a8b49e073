"""Creating and filling one VM's cgroup directories, before the VMM exists.

The common case takes no lock: every directory above the VM's exists already (another VM of
this parent runs), so only the VM's own directories are made (:func:`_prepare_in_place`).
Why that is safe without the host lock, which serialises creating and removing the
*intermediate* directories (the ledger and the parent chain):

* it makes no intermediate, so it has nothing to record in the ledger;
* ``mkdir`` of the VM's directory is the check that its parent exists, atomically: if a
  remover (or gc's sweep) took the parent away first, ``mkdir`` fails (``ENOENT``) and the
  careful path runs instead; once it succeeded, the kernel refuses to ``rmdir`` the parent
  (``EBUSY``) until the VM's directory is gone, so nobody removes the chain under it;
* on v2 the parent's ``cgroup.subtree_control`` must already distribute every controller
  (then every level above does too, by the kernel's rules): nothing needs enabling.

The chain above the VM's directory stays while the process that made it lives (see
:mod:`.chains`), so after the first VM the common case is this one, also for VMs started one
after another. If another process removed the chain meanwhile (its maker exited, a gc),
``mkdir`` fails with ``ENOENT`` and the chain is made again below.

Otherwise (a parent is missing, or anything is off), under the host lock: find the
intermediate directories that are missing, list them in the ledger (one write, before any
is made), create them and the VM's own directory, enable the controllers (v2) or copy the
cpuset (v1) as each level needs, then write every value. A value the kernel rejects is a
:class:`CgroupError` here, before anything is spawned; everything created is removed again
before it propagates.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import CgroupError, CleanupError
from . import chains as keeper
from . import ledger, removal
from .fs import read_optional, read_pids
from .layout import is_ancestor_or_equal
from .limits import setting
from .lock import HostLock
from .planning import UNIFIED, chain
from .rejections import errname

if TYPE_CHECKING:
    from .tree import VmCgroups

__all__ = ["prepare", "prepare_lock_free"]


def prepare(cg: VmCgroups, *, lock_free_tried: bool = False) -> None:
    """See :meth:`VmCgroups.prepare`."""
    chains = _chains(cg)
    if not lock_free_tried and _prepare_in_place(cg, chains):
        cg.prepared = True
        return
    with HostLock(cg.lock_path):
        missing: set[str] = set()
        try:
            missing = _missing_intermediates(cg, chains)
            # Record before make: a crash from here on leaves nothing gc cannot find.
            ledger.record(cg.lock_path, missing)
            if cg.version == 2:
                _prepare_v2(cg, chains[0][1], missing)
            else:
                _prepare_v1(cg, chains, missing)
            _resolve_cpuset_mems(cg)
            for s in cg.settings:
                cg._write_setting(s)
            keeper.learn(cg, ledger.listing(cg.lock_path))
        except BaseException as exc:
            keeper.forget(cg)
            problems, removed = cg._remove_created()
            for problem in problems:
                exc.add_note(f"rollback: {problem}")
            try:
                # Listed but never made (a step failed first) or made and removed: unlisted
                # without a look; what another VM left empty there goes too.
                created = {str(p) for p in cg.created}
                gone = {*removed, *(Path(p) for p in missing - created)}
                ledger.sweep(cg.lock_path, cg.fs, within=cg._vm_dirs, gone=gone)
            except OSError as sweep_exc:
                exc.add_note(f"rollback: intermediate cgroups: {sweep_exc}")
            raise
    cg.prepared = True


def prepare_lock_free(cg: VmCgroups) -> bool:
    """See :meth:`VmCgroups.prepare_lock_free`."""
    if _prepare_in_place(cg, _chains(cg)):
        cg.prepared = True
        return True
    return False


def _prepare_in_place(cg: VmCgroups, chains: list[_Chain]) -> bool:
    """Make and fill the VM's own directories without the host lock, if every parent exists.

    ``False``: not possible (a parent is missing, the VM's directory exists, v2 controllers
    to enable, any ``mkdir`` error); nothing is left made, use the locked path. A failure
    after that (a value the kernel rejects) removes what was made and raises.
    """
    for keys, dirs in chains:
        _check_inside_own(cg, keys[0], dirs[-1])
    try:
        for _keys, dirs in chains:
            where = Path(dirs[-1])
            cg.fs.mkdir(where)
            cg.created.append(where)
        if cg.version == 2 and not _distributes_all(cg, Path(chains[0][1][-1]).parent):
            raise _NotInPlace
        if cg.version == 1 and not _cpuset_parent_ready(cg, chains):
            raise _NotInPlace
    except (OSError, _NotInPlace):
        removal.remove_unfilled(cg)
        return False
    try:
        if cg.version == 1:
            for keys, dirs in chains:
                if "cpuset" in keys:
                    for name in ("cpuset.cpus", "cpuset.mems"):
                        _inherit(cg, Path(dirs[-1]), name)
        _resolve_cpuset_mems(cg)
        for s in cg.settings:
            cg._write_setting(s)
    except BaseException as exc:
        try:
            removal.remove(cg, timeout_s=5.0)  # lock-free too, unless it was the last one
        except CleanupError as cleanup_exc:
            for problem in cleanup_exc.failures:
                exc.add_note(f"rollback: {problem}")
        raise
    return True


class _NotInPlace(Exception):
    """The VM's directories cannot be made without the host lock."""


def _cpuset_parent_ready(cg: VmCgroups, chains: list[_Chain]) -> bool:
    """v1 cpuset: the parent has its cpus and mems. A locked prepare makes an intermediate
    cpuset directory and fills it afterwards; one seen empty may be in that gap, so the
    locked path decides (it waits for that prepare, then reports a really empty parent)."""
    for keys, dirs in chains:
        if "cpuset" in keys:
            parent = Path(dirs[-1]).parent
            for name in ("cpuset.cpus", "cpuset.mems"):
                if not read_optional(cg.fs, parent / name):
                    return False
    return True


def _distributes_all(cg: VmCgroups, parent: Path) -> bool:
    enabled = (read_optional(cg.fs, parent / "cgroup.subtree_control") or "").split()
    return all(ctrl in enabled for ctrl in cg.controllers)


#: One hierarchy: the keys (v1 controllers, or ``unified``) sharing a mount, and the
#: directories from the mount (exclusive) down to the VM's (inclusive).
_Chain = tuple[list[str], list[str]]


def _chains(cg: VmCgroups) -> list[_Chain]:
    by_mount: dict[Path, list[str]] = {}
    for key in (UNIFIED,) if cg.version == 2 else cg.controllers:
        by_mount.setdefault(cg.mounts[key], []).append(key)
    return [(keys, chain(mount, cg.parent, cg.vm_id)) for mount, keys in by_mount.items()]


def _missing_intermediates(cg: VmCgroups, chains: list[_Chain]) -> set[str]:
    """The directories between each mount and the VM's that do not exist (lock held).

    Looked up from the deepest up: once one exists, those above it do too. Refuses (before
    anything is made) to create one outside the orchestrator's own cgroup.
    """
    missing: set[str] = set()
    for keys, dirs in chains:
        for path in reversed(dirs[:-1]):
            if cg.fs.is_dir(Path(path)):
                break
            _check_inside_own(cg, keys[0], path)
            missing.add(path)
    return missing


def _check_inside_own(cg: VmCgroups, key: str, path: str) -> None:
    own = f"{cg.mounts[key]}/{cg.own[key]}"
    if not cg.explicit_parent and not is_ancestor_or_equal(own, path):
        raise CgroupError(
            f"refusing to create {path}: it is outside the orchestrator's own {key} "
            f"cgroup {own.rstrip('/')} (which does not exist?). Set JailerConfig.parent_cgroup "
            "to choose where VM cgroups go",
            controller=key,
            path=path,
        )


def _make(cg: VmCgroups, key: str, path: str, missing: set[str]) -> Path | None:
    """Create ``path`` (the VM's directory, or a missing intermediate); it if made here."""
    vm_dir = path not in missing
    if vm_dir:
        _check_inside_own(cg, key, path)
    where = Path(path)
    try:
        cg.fs.mkdir(where)
    except FileExistsError:
        if vm_dir:
            raise CgroupError(
                f"the cgroup {path} of VM {cg.vm_id} already exists: a VM with this id "
                "is running, or an earlier one was not cleaned up. Stop/clean it up "
                "(ironclaw cleanup, or rmdir the directory once it holds no processes) "
                "or use another id",
                controller=key,
                path=path,
            ) from None
        # Made by someone else since we looked: not ours, so not listed.
        missing.discard(path)
        ledger.forget(cg.lock_path, [where])
        return None
    except OSError as exc:
        raise CgroupError(
            f"cannot create cgroup directory {path} ({key}): {errname(exc)} "
            f"{exc.strerror}. Run as root, or set JailerConfig.parent_cgroup to a "
            "subtree delegated to this user",
            controller=key,
            path=path,
        ) from exc
    cg.created.append(where)
    return where


def _prepare_v1(cg: VmCgroups, chains: list[_Chain], missing: set[str]) -> None:
    for keys, dirs in chains:
        for path in dirs:
            if path in missing or path == dirs[-1]:
                made = _make(cg, keys[0], path, missing)
                if made is not None and "cpuset" in keys:
                    for name in ("cpuset.cpus", "cpuset.mems"):
                        _inherit(cg, made, name)


def _inherit(cg: VmCgroups, path: Path, name: str) -> None:
    """v1 cpuset: a new cgroup starts with empty cpus/mems; copy the parent's."""
    src = path.parent / name
    value = read_optional(cg.fs, src)
    if not value:
        raise CgroupError(
            f"cannot initialise {path / name}: the parent's {src} is "
            f"{'empty' if value == '' else 'unreadable'}. Give the parent cgroup CPUs and "
            "memory nodes first, or set JailerConfig.parent_cgroup elsewhere",
            controller="cpuset",
            path=str(src),
            value=value,
        )
    cg._write(path / name, value, "cpuset", "copying the parent's value")


def _prepare_v2(cg: VmCgroups, dirs: list[str], missing: set[str]) -> None:
    mount = cg.mounts[UNIFIED]
    own = mount / cg.own[UNIFIED]
    levels = [str(mount), *dirs]
    for i, name in enumerate(levels):
        made = None
        if i > 0 and (name in missing or i == len(levels) - 1):
            made = _make(cg, UNIFIED, name, missing)
        if i == len(levels) - 1:
            break
        path = made or Path(name)
        # A cgroup made just now distributes no controller yet: nothing to read.
        subtree = "" if made else read_optional(cg.fs, path / "cgroup.subtree_control")
        enabled = set((subtree or "").split())
        for ctrl in cg.controllers:
            if ctrl in enabled:
                continue
            outside = path != own and is_ancestor_or_equal(name, str(own))
            if outside and not cg.explicit_parent:
                raise CgroupError(
                    f"controller {ctrl} is not enabled in {path}/cgroup.subtree_control, "
                    f"above the orchestrator's own cgroup {own}; ironclaw does not change "
                    f"cgroups it does not own. Enable it there (echo +{ctrl} > "
                    f"{path}/cgroup.subtree_control, or systemd Delegate=yes) or set "
                    "JailerConfig.parent_cgroup to a delegated subtree",
                    controller=ctrl,
                    path=str(path / "cgroup.subtree_control"),
                    value=f"+{ctrl}",
                )
            _enable(cg, path, ctrl)


def _enable(cg: VmCgroups, path: Path, ctrl: str) -> None:
    target = path / "cgroup.subtree_control"
    try:
        cg.fs.write(target, f"+{ctrl}")
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            pids = read_pids(cg.fs, path / "cgroup.procs")
            who = ", ".join(map(str, pids[:20])) or "(none listed; threads or a race)"
            mine = " (including this orchestrator)" if os.getpid() in pids else ""
            raise CgroupError(
                f"cannot enable controller {ctrl} for child cgroups: writing '+{ctrl}' to "
                f"{target} failed with EBUSY because the cgroup {path} holds processes "
                f"{who}{mine}; cgroup v2's no-internal-processes rule forbids distributing "
                "a controller from a cgroup that has processes. Set "
                "JailerConfig.parent_cgroup to a delegated subtree that holds no "
                "processes, e.g. run the orchestrator under systemd with Delegate=yes, "
                "move the orchestrator itself into a leaf (such as <service>/orchestrator) "
                "and use parent_cgroup='<service>/vms'",
                controller=ctrl,
                path=str(target),
                value=f"+{ctrl}",
            ) from exc
        raise CgroupError(
            f"cannot enable controller {ctrl}: writing '+{ctrl}' to {target} failed with "
            f"{errname(exc)} {exc.strerror}. Check that {path}/cgroup.controllers lists "
            f"{ctrl}, or set JailerConfig.parent_cgroup elsewhere",
            controller=ctrl,
            path=str(target),
            value=f"+{ctrl}",
        ) from exc


def _resolve_cpuset_mems(cg: VmCgroups) -> None:
    files = [s.file for s in cg.settings]
    if "cpuset.cpus" not in files or "cpuset.mems" in files:
        return
    parent = cg._paths[cg._key("cpuset")].parent
    names = ("cpuset.mems",) if cg.version == 1 else ("cpuset.mems.effective", "cpuset.mems")
    value = None
    for name in names:
        value = read_optional(cg.fs, parent / name)
        if value:
            break
    if not value:
        raise CgroupError(
            f"cpuset_cpus is set but cpuset_mems is not, and the parent cgroup {parent} "
            "has no memory nodes to inherit: set JailerConfig.cpuset_mems (e.g. '0')",
            controller="cpuset",
            path=str(parent / names[0]),
        )
    at = files.index("cpuset.cpus") + 1
    cg.settings.insert(at, setting("cpuset", "cpuset.mems", value))
