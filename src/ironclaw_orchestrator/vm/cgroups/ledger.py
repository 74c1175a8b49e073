"""A host-wide list of intermediate cgroup directories created for VMs.

The jailer takes one ``--parent-cgroup`` for every hierarchy, so a VM may need directories
above its own (``cpu/<own path>/ironclaw`` where only ``memory/<own path>`` existed). The VM
that made one may stop while another VM still uses it; the last VM to stop (or ``gc``) must
remove it, but by then nobody remembers who made it. This ledger remembers: every
intermediate directory we create is listed (under the cgroup :class:`HostLock`), and one is
removed, deepest first, once empty. Directories we did not create are never listed.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path

from ...safefs import replace_file
from .fs import CgroupFs

__all__ = ["ledger_path", "record_intermediate", "sweep"]


def ledger_path(lock_path: Path) -> Path:
    return lock_path.with_name("cgroup-intermediates")


def _read(path: Path) -> list[Path]:
    try:
        return [Path(line) for line in path.read_text().splitlines() if line.startswith("/")]
    except FileNotFoundError:
        return []


def _write(path: Path, entries: Iterable[Path]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("".join(f"{p}\n" for p in sorted(set(entries))))
    replace_file(tmp, path)


def record_intermediate(lock_path: Path, directory: Path) -> None:
    """List ``directory`` (just created for a VM). Hold the cgroup host lock."""
    path = ledger_path(lock_path)
    _write(path, [*_read(path), directory])


def sweep(
    lock_path: Path,
    fs: CgroupFs,
    within: Iterable[Path] | None = None,
) -> list[Path]:
    """Remove listed directories that are empty, deepest first; return those removed.

    ``within``: only entries that are ancestors of these paths (a stopping VM's cgroups).
    Hold the cgroup host lock. A busy directory (another VM's cgroup inside) stays listed.
    """
    path = ledger_path(lock_path)
    entries = _read(path)
    if not entries:
        return []
    # Plain string prefixes: ``Path.parents`` membership costs ~15 us an entry.
    scope = [f"{p}/" for p in within] if within is not None else None
    removed: list[Path] = []
    keep: list[Path] = []
    for entry in sorted(entries, key=lambda p: len(p.parts), reverse=True):
        if scope is not None and not any(p.startswith(f"{entry}/") for p in scope):
            keep.append(entry)
            continue
        if not fs.is_dir(entry):
            continue  # gone: forget it
        if not fs.is_cgroup(entry):
            continue  # not a cgroup (forged or stale entry): forget it, never rmdir it
        try:
            fs.rmdir(entry)
            removed.append(entry)
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY, errno.EEXIST):
                raise
            keep.append(entry)
    if sorted(set(keep)) != sorted(set(entries)):
        _write(path, keep)
    return removed
