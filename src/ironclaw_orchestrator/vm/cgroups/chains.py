"""The parent chains of this process's VMs: kept while the process lives, removed at its exit.

VM cgroups go beneath ``<own cgroup>/ironclaw`` (or ``parent_cgroup``); the directories above
a VM's that did not exist (a few per v1 hierarchy) are the *chain*. The process that makes a
chain keeps it until it exits, as docker and systemd keep their parent cgroups: VMs started
one after another (a library user, the host service, a CI runner) then make and remove only
their own directories, without the host lock or a ledger write, instead of every VM paying
for the whole chain again (~5 ``mkdir`` + 5 ``rmdir``, 2 ledger writes, the lock).

What is left on the host while an orchestrator runs: empty cgroup directories (no process,
no limit of their own; a few KiB of kernel memory each), listed in the ledger with their
maker. They go:

* at the maker's exit (:func:`release`, an ``atexit`` hook; ``ironclaw`` commands run it
  too), with the ledger's sweep, the function a stopping VM and ``gc`` use: only what is
  empty, only what the ledger lists as made by this process (or by one that is gone);
* after a crash (SIGKILL), at ``ironclaw gc`` or the next sweep by any orchestrator (its
  last VM out of the same parent): the ledger names the dead maker.

No idle timer: an empty chain costs nothing measurable, a timer would bring back the churn
for every workload whose gaps exceed it, and "present while the orchestrator runs, gone
when it exits" is a rule an operator can check (``ironclaw gc`` never removes a live
maker's chain). Call :func:`release` to drop them earlier.

Fork safety: a forked child starts with nothing kept, and its exit hook only acts in the
process that registered what it keeps; the ledger's owner check (pid + start time) spares
the parent's chain besides. A chain removed from under its maker (by hand, or by an older
release's gc) is made again: a lock-free ``mkdir`` of a VM directory fails with ``ENOENT``
and the locked path remakes and relists what is missing (see :mod:`.creation`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from . import ledger
from .fs import CgroupFs
from .lock import HostLock

if TYPE_CHECKING:
    from .tree import VmCgroups

__all__ = ["keeps", "learn", "release"]


class _State:
    def __init__(self) -> None:
        self.guard = threading.Lock()
        self.pid = os.getpid()
        #: lock path -> (the cgroup fs to remove with, parent dirs whose chain is kept).
        self.kept: dict[Path, tuple[CgroupFs, set[Path]]] = {}
        self.hooked = False


_state = _State()


def _after_fork_in_child() -> None:
    global _state
    hooked = _state.hooked
    _state = _State()
    _state.hooked = hooked  # the inherited atexit hook stays registered


os.register_at_fork(after_in_child=_after_fork_in_child)


def keeps(cg: VmCgroups) -> bool:
    """Whether the parent of each of ``cg``'s directories is a chain this process keeps
    (lock-free: then a stopping VM has nothing else to remove)."""
    entry = _state.kept.get(cg.lock_path)
    return entry is not None and all(d.parent in entry[1] for d in cg._vm_dirs)


def learn(cg: VmCgroups, listed: dict[str, str | None]) -> None:
    """After a locked prepare or remove of ``cg`` (lock held; ``listed``: the ledger then):
    keep each parent that is listed with a live maker (this process, or another one still
    running: its maker removes it), or that is an explicit ``parent_cgroup`` nobody listed
    (someone else's, never removed by us). Also registers the exit hook."""
    parents = set()
    for parent in {d.parent for d in cg._vm_dirs}:
        owner = listed.get(str(parent), "")
        if owner == "":  # not listed
            if cg.explicit_parent and cg.fs.is_dir(parent):
                parents.add(parent)
        elif ledger.owner_alive(owner):
            parents.add(parent)
    if not parents:
        return  # nothing kept (had this process made a chain, its maker would be alive)
    with _state.guard:
        fs, kept = _state.kept.setdefault(cg.lock_path, (cg.fs, set()))
        if fs is not cg.fs:
            _state.kept[cg.lock_path] = (cg.fs, kept)
        kept.update(parents)
        if not _state.hooked:
            atexit.register(_at_exit)
            _state.hooked = True


def kept_parents() -> set[Path]:
    """Every parent this process keeps, under any ledger (a VM of another run root must not
    take one away from under this process's VMs)."""
    with _state.guard:
        return {p for _fs, parents in _state.kept.values() for p in parents}


def forget(cg: VmCgroups) -> None:
    """Stop keeping ``cg``'s parents (after a failure that may have removed them)."""
    entry = _state.kept.get(cg.lock_path)
    if entry is not None:
        with _state.guard:
            entry[1].difference_update(d.parent for d in cg._vm_dirs)


def release(lock_paths: Iterable[Path] | None = None) -> list[Path]:
    """Remove the empty chains this process made (and kept ones whose maker is gone), under
    the host lock, with the ledger's sweep; return what was removed. ``lock_paths``: only
    those hosts' (default: all). Busy directories (a VM still runs) stay listed. Idempotent;
    VMs started later make their chain again."""
    with _state.guard:
        keys = list(_state.kept) if lock_paths is None else [Path(p) for p in lock_paths]
        taken = {k: _state.kept.pop(k) for k in keys if k in _state.kept}
    removed: list[Path] = []
    me = ledger.this_process()
    for lock_path, (fs, parents) in taken.items():
        if not ledger.ledger_path(lock_path).exists():
            continue  # nothing listed (and the lock's directory may be gone: leave it so)
        with HostLock(lock_path):
            mine = [Path(p) for p, o in ledger.listing(lock_path).items() if o == me]
            removed += ledger.sweep(
                lock_path,
                fs,
                within=[*parents, *mine],
                spare=lambda owner: owner != me and ledger.owner_alive(owner),
            )
            # What is still busy (another process's VMs in it) is handed over: ownerless,
            # the last VM out or the next sweep removes it, even while this process is
            # still seen alive on its way out.
            ledger.disown(lock_path, me)
    return removed


def _at_exit() -> None:
    if _state.pid != os.getpid():
        return  # not the process that kept these (defensive: a fork resets the state)
    with contextlib.suppress(Exception):  # exit anyway: gc finds what the ledger lists
        release()
