"""A host-wide list of intermediate cgroup directories created for VMs.

The jailer takes one ``--parent-cgroup`` for every hierarchy, so a VM may need directories
above its own (``cpu/<own path>/ironclaw`` where only ``memory/<own path>`` existed). The VM
that made one may stop while another VM still uses it; the last VM to stop (or ``gc``) must
remove it, but by then nobody remembers who made it. This ledger remembers: every
intermediate directory we create is listed (under the cgroup :class:`HostLock`) before it is
made, and one is removed, deepest first, once empty. Directories we did not create are never
listed: a prepare lists only directories that did not exist under the lock, and drops one again
if its ``mkdir`` finds it made by someone else after all.

Each change rewrites the file atomically (a new file swapped in), which costs an inode
allocation and a free where /run is a disk file system: callers batch their changes (one
write per prepare, one per removal) and nothing is written when nothing changed.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path

from ...safefs import replace_file
from .fs import CgroupFs

__all__ = ["forget", "ledger_path", "record", "record_intermediate", "sweep"]


def ledger_path(lock_path: Path) -> Path:
    return lock_path.with_name("cgroup-intermediates")


def _read(path: Path) -> list[str]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    try:
        chunks = [os.read(fd, 65536)]
        while chunks[-1]:
            chunks.append(os.read(fd, 65536))
    finally:
        os.close(fd)
    text = b"".join(chunks).decode("utf-8")
    return [line for line in text.splitlines() if line.startswith("/")]


def _write(path: Path, entries: Iterable[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("".join(f"{p}\n" for p in sorted(set(entries))))
    replace_file(tmp, path)


def record(lock_path: Path, directories: Iterable[Path | str]) -> None:
    """List ``directories`` (about to be created for a VM) in one write. Hold the host lock."""
    new = {str(d) for d in directories}
    if not new:
        return
    path = ledger_path(lock_path)
    entries = set(_read(path))
    if not new <= entries:
        _write(path, entries | new)


def record_intermediate(lock_path: Path, directory: Path) -> None:
    """List ``directory`` (created for a VM). Hold the cgroup host lock."""
    record(lock_path, [directory])


def forget(lock_path: Path, directories: Iterable[Path | str]) -> None:
    """Unlist ``directories`` (listed, but not made by us after all). Hold the host lock."""
    drop = {str(d) for d in directories}
    if not drop:
        return
    path = ledger_path(lock_path)
    entries = set(_read(path))
    if entries & drop:
        _write(path, entries - drop)


def sweep(
    lock_path: Path,
    fs: CgroupFs,
    within: Iterable[Path] | None = None,
    gone: Iterable[Path] = (),
) -> list[Path]:
    """Remove listed directories that are empty, deepest first; return those removed.

    ``within``: only entries that are ancestors of these paths (a stopping VM's cgroups).
    ``gone``: directories the caller knows no longer exist (it just removed them): unlisted
    without a look. Hold the cgroup host lock. A busy directory (another VM's cgroup inside)
    stays listed. The file is rewritten only if the list changed.
    """
    path = ledger_path(lock_path)
    entries = _read(path)
    if not entries:
        return []
    known_gone = {str(p) for p in gone}
    # Plain string prefixes: ``Path.parents`` membership costs ~15 us an entry.
    scope = [f"{p}/" for p in within] if within is not None else None
    removed: list[Path] = []
    keep: list[str] = []
    for entry in sorted(set(entries), key=lambda p: p.count("/"), reverse=True):
        if entry in known_gone:
            continue
        if scope is not None and not any(p.startswith(f"{entry}/") for p in scope):
            keep.append(entry)
            continue
        where = Path(entry)
        if not fs.is_dir(where):
            continue  # gone: forget it
        if not fs.is_cgroup(where):
            continue  # not a cgroup (forged or stale entry): forget it, never rmdir it
        try:
            fs.rmdir(where)
            removed.append(where)
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY, errno.EEXIST):
                raise
            keep.append(entry)
    if set(keep) != set(entries):
        _write(path, keep)
    return removed
