"""A host-wide list of intermediate cgroup directories created for VMs.

The jailer takes one ``--parent-cgroup`` for every hierarchy, so a VM may need directories
above its own (``cpu/<own path>/ironclaw`` where only ``memory/<own path>`` existed). The VM
that made one may stop while another VM still uses it; the last VM to stop (or ``gc``) must
remove it, but by then nobody remembers who made it. This ledger remembers: every
intermediate directory we create is listed (under the cgroup :class:`HostLock`) before it is
made, and one is removed, deepest first, once empty. Directories we did not create are never
listed: a prepare lists only directories that did not exist under the lock, and drops one again
if its ``mkdir`` finds it made by someone else after all.

Each entry names the process that made the directory (``<pid>:<start time>``): a chain
stays while its maker lives (see :mod:`.chains`), so a sweep (another orchestrator's last VM
out, ``gc``) spares an entry whose owner is alive and removes one whose owner is gone (a
crash) once it is empty. The file keeps a line per directory (its path, as older releases
read and write it) followed by ``owner<TAB><pid>:<start time><TAB><path>``; an older release
rewriting the file keeps the paths and drops the owners, so its entries become ownerless:
swept once empty, as before (the maker then remakes its chain when it needs it again).

Each change rewrites the file atomically (a new file swapped in), which costs an inode
allocation and a free where /run is a disk file system: callers batch their changes (one
write per prepare, one per removal) and nothing is written when nothing changed.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from ... import procfs
from ...safefs import replace_file
from .fs import CgroupFs

__all__ = [
    "forget",
    "ledger_path",
    "listing",
    "owner_alive",
    "record",
    "record_intermediate",
    "sweep",
    "this_process",
]


def ledger_path(lock_path: Path) -> Path:
    return lock_path.with_name("cgroup-intermediates")


_OWNER = "owner\t"
_me: tuple[int, str] | None = None


def this_process() -> str:
    """This process as a ledger owner: ``<pid>:<start time>`` (a recycled pid differs)."""
    global _me
    pid = os.getpid()
    if _me is None or _me[0] != pid:  # first use, or a forked child
        _me = (pid, f"{pid}:{procfs.read_start_time(pid)}")
    return _me[1]


def owner_alive(owner: str | None) -> bool:
    """Whether the process an entry names still runs (``False`` for no or a bad owner)."""
    if not owner:
        return False
    pid, _, start = owner.partition(":")
    if not (pid.isdigit() and start.isdigit()):
        return False
    return procfs.is_alive(int(pid), int(start))


def _read(path: Path) -> dict[str, str | None]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}
    try:
        chunks = [os.read(fd, 65536)]
        while chunks[-1]:
            chunks.append(os.read(fd, 65536))
    finally:
        os.close(fd)
    paths: list[str] = []
    owners: dict[str, str] = {}
    for line in b"".join(chunks).decode("utf-8").splitlines():
        if line.startswith("/"):
            paths.append(line)
        elif line.startswith(_OWNER):
            owner, _, where = line[len(_OWNER) :].partition("\t")
            owners[where] = owner
    return {p: owners.get(p) or None for p in paths}


def _write(path: Path, entries: dict[str, str | None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(
            "".join(
                f"{p}\n{_OWNER}{o}\t{p}\n" if o else f"{p}\n" for p, o in sorted(entries.items())
            )
        )
    replace_file(tmp, path)


def listing(lock_path: Path) -> dict[str, str | None]:
    """Listed directory -> its owner (``None``: ownerless). Hold the host lock."""
    return _read(ledger_path(lock_path))


def record(lock_path: Path, directories: Iterable[Path | str]) -> None:
    """List ``directories`` (about to be created for a VM by this process) in one write.
    Hold the host lock."""
    new = {str(d) for d in directories}
    if not new:
        return
    path = ledger_path(lock_path)
    entries = _read(path)
    me = this_process()
    if any(entries.get(d) != me for d in new):
        entries.update(dict.fromkeys(new, me))
        _write(path, entries)


def record_intermediate(lock_path: Path, directory: Path) -> None:
    """List ``directory`` (created for a VM). Hold the cgroup host lock."""
    record(lock_path, [directory])


def disown(lock_path: Path, owner: str) -> None:
    """List ``owner``'s directories as ownerless (its maker is leaving while another
    process's VMs still use them): the next sweep removes them once empty, instead of
    sparing them while the exiting maker can still be seen alive. Hold the host lock."""
    path = ledger_path(lock_path)
    entries = _read(path)
    if owner in entries.values():
        _write(path, {p: (None if o == owner else o) for p, o in entries.items()})


def forget(lock_path: Path, directories: Iterable[Path | str]) -> None:
    """Unlist ``directories`` (listed, but not made by us after all). Hold the host lock."""
    drop = {str(d) for d in directories}
    if not drop:
        return
    path = ledger_path(lock_path)
    entries = _read(path)
    if drop & entries.keys():
        _write(path, {p: o for p, o in entries.items() if p not in drop})


def sweep(
    lock_path: Path,
    fs: CgroupFs,
    within: Iterable[Path] | None = None,
    gone: Iterable[Path] = (),
    spare: Callable[[str | None], bool] | None = None,
) -> list[Path]:
    """Remove listed directories that are empty, deepest first; return those removed.

    ``within``: only entries that are ancestors of these paths, or these paths (a stopping
    VM's cgroups; a process's chains). ``gone``: directories the caller knows no longer
    exist (it just removed them): unlisted without a look. ``spare(owner)``: keep an
    entry (by default: while its maker lives; its chain is in use). Hold the cgroup host
    lock. A busy directory (another VM's cgroup inside) stays listed; one that no longer
    exists is unlisted. The file is rewritten only if the list changed.
    """
    path = ledger_path(lock_path)
    entries = _read(path)
    if not entries:
        return []
    known_gone = {str(p) for p in gone}
    spare = spare or owner_alive
    # Plain string prefixes: ``Path.parents`` membership costs ~15 us an entry.
    scope = [f"{p}/" for p in within] if within is not None else None
    removed: list[Path] = []
    keep: dict[str, str | None] = {}
    for entry in sorted(entries, key=lambda p: p.count("/"), reverse=True):
        owner = entries[entry]
        if entry in known_gone:
            continue
        if scope is not None and not any(p.startswith(f"{entry}/") for p in scope):
            keep[entry] = owner
            continue
        where = Path(entry)
        if not fs.is_dir(where):
            continue  # gone: forget it
        if not fs.is_cgroup(where):
            continue  # not a cgroup (forged or stale entry): forget it, never rmdir it
        if spare(owner):
            keep[entry] = owner
            continue
        try:
            fs.rmdir(where)
            removed.append(where)
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY, errno.EEXIST):
                raise
            keep[entry] = owner
    if keep != entries:
        _write(path, keep)
    return removed
