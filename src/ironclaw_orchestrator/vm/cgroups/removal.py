"""Removing one VM's cgroup directories (and the intermediates nobody uses any more).

Only directories the VM's :class:`VmCgroups` created are touched, plus (with the derived
parent) that parent when it is empty, and intermediates listed in the ledger once empty.
A VM cgroup that is already empty goes with one ``rmdir`` (the kernel refuses it, atomically,
while the cgroup holds a process or a child); only one that does not is drained: its
processes are killed, waited for, and its subtree removed.

The host lock (and the ledger) is only needed when a parent may have become empty: if,
after the VM's own directories are gone, each of their parents is a chain this process keeps
(:mod:`.chains`: it stays while its maker lives) or still has a child cgroup (another VM's),
there is nothing else to remove, so no lock is taken. Otherwise, under the lock, what is empty
goes, except a chain whose maker (per the ledger) still runs: the directories this VM made,
its derived parent, and listed intermediates of dead makers (a crashed orchestrator's).
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import CleanupError
from . import chains as keeper
from . import drain, ledger
from .fs import CgroupFs
from .lock import DEFAULT_LOCK_PATH, HostLock
from .rejections import errname

if TYPE_CHECKING:
    from .tree import VmCgroups

__all__ = [
    "parents_in_use",
    "remove",
    "remove_created",
    "remove_lock_free",
    "remove_unfilled",
    "sweep_intermediates",
]

_BUSY = (errno.EBUSY, errno.ENOTEMPTY, errno.EEXIST)


def _try_rmdir(fs: CgroupFs, path: Path) -> OSError | None:
    """``rmdir``; ``None`` if the directory is gone (removed now or before), else the error."""
    try:
        fs.rmdir(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return exc
    return None


def remove_created(
    cg: VmCgroups, skip: set[Path], keep: frozenset[Path] = frozenset()
) -> tuple[list[str], set[Path]]:
    """Remove (deepest first) the directories ``cg`` created, except ``skip`` (known gone)
    and ``keep`` (a live process's chain: no longer this VM's to remove).

    Lock must be held. Returns the failures and the directories now gone.
    """
    failures: list[str] = []
    gone = set(skip)
    vm_dirs = set(cg._vm_dirs)
    todo = set(cg.created) - skip - keep
    for path in sorted(todo, key=lambda p: len(p.parts), reverse=True):
        exc = _try_rmdir(cg.fs, path)
        if exc is None:
            gone.add(path)
        elif not (path not in vm_dirs and exc.errno in _BUSY):  # busy: another VM's inside
            failures.append(f"rmdir {path}: {errname(exc)} {exc.strerror}")
    if not failures:
        cg.created.clear()
    return failures, gone


def remove(cg: VmCgroups, timeout_s: float) -> None:
    """See :meth:`VmCgroups.remove`."""
    if not cg.created:  # nothing of ours (never prepared, or removed already)
        cg.prepared = False
        return
    failures: list[str] = []
    owned = set(cg.created)
    gone, busy = _remove_vm_dirs(cg)
    if busy:
        drain.drain(cg.fs, cg.version, busy, timeout_s, failures)
    elif _nothing_else(cg):
        return
    with HostLock(cg.lock_path):
        listed = ledger.listing(cg.lock_path)
        live = frozenset(Path(p) for p, o in listed.items() if ledger.owner_alive(o))
        for top in busy:
            for sub in drain.all_cgroups(cg.fs, top):
                drain.rmdir(cg.fs, sub, failures, tolerate_busy=False)
            if not cg.fs.is_dir(top):
                gone.add(top)
        problems, gone = remove_created(cg, gone, keep=live)
        failures += problems
        if not cg.explicit_parent:
            # The derived parent (<own>/ironclaw), if this VM did not make it and no live
            # process keeps it: empty, it goes.
            spared = live | keeper.kept_parents()
            for parent in {p.parent for p in cg._vm_dirs} - set(owned) - spared:
                exc = _try_rmdir(cg.fs, parent)
                if exc is None:
                    gone.add(parent)
                elif exc.errno not in _BUSY:
                    failures.append(f"rmdir {parent}: {errname(exc)} {exc.strerror}")
        # Intermediate dirs another VM made for the same parent: the last one out removes
        # them (see ledger).
        try:
            ledger.sweep(cg.lock_path, cg.fs, within=cg._vm_dirs, gone=gone)
        except OSError as exc:
            failures.append(f"intermediate cgroups: {errname(exc)} {exc.strerror}")
        keeper.learn(cg, listed)
    cg.prepared = False
    if failures:
        unique = list(dict.fromkeys(failures))
        raise CleanupError(f"removing the cgroups of VM {cg.vm_id} failed", unique)


def remove_lock_free(cg: VmCgroups) -> bool:
    """See :meth:`VmCgroups.remove_lock_free`."""
    if not cg.created:
        cg.prepared = False
        return True
    _, busy = _remove_vm_dirs(cg)
    return not busy and _nothing_else(cg)


def _remove_vm_dirs(cg: VmCgroups) -> tuple[set[Path], list[Path]]:
    """``rmdir`` each VM directory this object created: (gone, busy). Only those: a VM dir
    found pre-existing by prepare() is someone else's (the same id still running)."""
    owned = set(cg.created)
    gone: set[Path] = set()
    busy: list[Path] = []
    for top in cg._vm_dirs:
        if top in owned:
            if _try_rmdir(cg.fs, top) is None:
                gone.add(top)
            else:
                busy.append(top)  # processes or child cgroups left (or an error): drain
    return gone, busy


def _nothing_else(cg: VmCgroups) -> bool:
    """After the VM's directories went: done if every intermediate this VM made is this
    process's kept chain (removed at its exit) or an ancestor of a busy parent (busy too,
    and listed in the ledger, whose sweep removes it once empty and its maker gone)."""
    if keeper.keeps(cg) or parents_in_use(cg):
        cg.created.clear()
        cg.prepared = False
        return True
    return False


def parents_in_use(cg: VmCgroups) -> bool:
    """Whether the parent of each of the VM's directories holds a child cgroup (lock-free)."""
    return all(cg.fs.has_child_cgroups(p) for p in {d.parent for d in cg._vm_dirs})


def remove_unfilled(cg: VmCgroups) -> None:
    """Remove the VM directories a lock-free prepare just made, before it takes the locked
    path instead (which makes what it needs again; a directory that stays is its error)."""
    for path in reversed(cg.created):
        if _try_rmdir(cg.fs, path) is None:
            cg.created.remove(path)


def sweep_intermediates(
    lock_path: Path = DEFAULT_LOCK_PATH,
    fs: CgroupFs | None = None,
    within: list[Path] | None = None,
) -> list[Path]:
    """Remove empty intermediate cgroup dirs made for VMs (``ironclaw gc``); return them.

    A chain whose maker still runs is spared (it is kept for that process's next VM).
    ``within``: only listed directories that are these paths or their ancestors."""
    with HostLock(lock_path):
        return ledger.sweep(lock_path, fs or CgroupFs(), within=within)
