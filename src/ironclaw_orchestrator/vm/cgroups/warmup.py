"""Readying the kernel's cgroup-migration lock before the jailer needs it.

Moving a task between cgroups takes one host-wide lock (``cgroup_threadgroup_rwsem``, a
per-CPU rwsem) for writing. The first writer after a quiet spell, about 10-20 ms without a
migration, waits for a whole RCU grace period: ~8 ms on the development host, against 0.04
ms right after another migration (cgroup v1 and v2 alike; not on a host that mounts
cgroups with ``favordynmods``). For a lone start that first writer is the jailer, moving
itself into the VM's cgroups: more than half of its own start-up.

So a start begins a migration of its own in a worker thread as soon as the VM's cgroups are
planned: the thread sleeps through the grace period while the start claims its directories
and makes its namespace, and the jailer's move finds the lock ready. The move is a no-op: on
v1 the worker thread moves itself (its ``tasks`` entry) into the cgroup it is in, so no
other thread can be affected; on v2, where only whole processes move, the process moves into
the cgroup it is in, and only in a plain ``domain`` cgroup (not the root, not a threaded
one: either may hold its threads in several). Both read the thread's cgroup from
``/proc/thread-self/cgroup`` right before writing; an administrator moving the orchestrator
in the microseconds between would see that one worker thread (v1) or the process (v2) put
back. At most one warm-up per ``WARM_WINDOW_S``: a burst of starts keeps the lock ready by
itself. Best effort: any failure is logged at debug level and changes nothing.

A pending move holds the kernel's ``cgroup_mutex`` through the grace period, and every
cgroup ``mkdir``/``rmdir`` needs it: so a start that warms the lock makes its own cgroups in
a worker thread (which waits there, not the event loop), then stages the jail and spawns
the jailer. A burst of starts warms it once: each jailer's spawn counts as a move to come.
A stop's ``rmdir`` on the event loop can still wait out the rest of a grace period when a
cold start or a jailer elsewhere is moving a task at that moment.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .fs import CgroupFs, read_optional
from .layout import CgroupLayout, parse_proc_cgroup

__all__ = ["WARM_WINDOW_S", "migrate_in_place", "migration_coming", "warm_migration_lock"]

log = logging.getLogger(__name__)

#: A migration keeps the lock ready for 10-20 ms: no warm-up within this of the last one,
#: or of a jailer's spawn (it moves itself into its cgroups within a few ms).
WARM_WINDOW_S = 0.010

_last_warm = -1.0


def migration_coming() -> None:
    """A jailer was just spawned: its own move keeps the lock warm for the next starts."""
    global _last_warm
    _last_warm = time.monotonic()


def _thread_cgroup() -> str:
    with open("/proc/thread-self/cgroup", encoding="utf-8") as f:
        return f.read()


def warm_migration_lock(
    layout: CgroupLayout,
    fs: CgroupFs,
    *,
    read_own: Callable[[], str] = _thread_cgroup,
) -> asyncio.Future[bool] | None:
    """Start a no-op migration in a worker thread, unless one started (or a jailer was
    spawned) within ``WARM_WINDOW_S``; its future says whether it moved (``None``: none
    started). Until it is done, cgroup ``mkdir``/``rmdir`` wait for it: not on the event loop."""
    global _last_warm
    now = time.monotonic()
    if 0 <= now - _last_warm < WARM_WINDOW_S:
        return None
    _last_warm = now
    fut = asyncio.get_running_loop().run_in_executor(None, migrate_in_place, layout, fs, read_own)
    fut.add_done_callback(_retrieve)
    return fut


def migrate_in_place(
    layout: CgroupLayout, fs: CgroupFs, read_own: Callable[[], str] = _thread_cgroup
) -> bool:
    """Move the calling thread (v1) or process (v2) into the cgroup it is in; ``True`` if
    the kernel took the move. Never raises for a host that cannot (logged at debug)."""
    try:
        own = parse_proc_cgroup(read_own())
        target = _target(layout, fs, own)
        if target is None:
            return False
        path, who = target
        fs.write(path, who)
        return True
    except (OSError, ValueError) as exc:
        log.debug("cgroup migration warm-up skipped: %s", exc)
        return False


def _target(layout: CgroupLayout, fs: CgroupFs, own: dict[str, str]) -> tuple[Path, str] | None:
    if layout.v1_mounts:
        for ctrl in sorted(layout.v1_mounts):
            mount = layout.v1_mounts[ctrl]
            where = layout.visible_path(mount, own.get(ctrl, ""))
            if ctrl in own and where is not None:
                return _join(mount, where) / "tasks", str(threading.get_native_id())
        return None
    if layout.unified_mount is None or "" not in own:
        return None
    where = layout.visible_path(layout.unified_mount, own[""])
    if where is None:
        return None
    cgroup = _join(layout.unified_mount, where)
    # Only a plain domain cgroup: a threaded one (or a threaded subtree's domain) may hold
    # our threads in several cgroups, and so may the true root, which has no type file.
    kind = read_optional(fs, cgroup / "cgroup.type")
    if kind is None or kind.strip() != "domain":
        return None
    return cgroup / "cgroup.procs", str(os.getpid())


def _join(mount: Path, where: str) -> Path:
    return mount / where if where else mount


def _retrieve(fut: asyncio.Future[bool]) -> None:
    if not fut.cancelled():
        fut.exception()
