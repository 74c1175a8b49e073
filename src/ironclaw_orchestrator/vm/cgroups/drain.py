"""Emptying and removing a VM's cgroup directories: kill what is inside, wait, rmdir."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from .fs import CgroupFs, read_optional, read_pids
from .rejections import errname
from .stats import parse_flat_keyed

__all__ = ["all_cgroups", "drain", "kill_all", "pids_in", "populated", "rmdir"]


def all_cgroups(fs: CgroupFs, top: Path) -> list[Path]:
    """``top`` and its descendants, deepest first."""
    out: list[Path] = []
    for sub in fs.subdirs(top):
        out += all_cgroups(fs, sub)
    out.append(top)
    return out


def pids_in(fs: CgroupFs, version: int, cg: Path) -> set[int]:
    pids = set(read_pids(fs, cg / "cgroup.procs"))
    if version == 1:
        pids |= set(read_pids(fs, cg / "tasks"))
    return pids


def populated(fs: CgroupFs, version: int, top: Path) -> set[int]:
    """Pids left anywhere in ``top``'s subtree (none, quickly, if v2 says it is empty)."""
    if version == 2:
        events = read_optional(fs, top / "cgroup.events")
        if events is not None and parse_flat_keyed(events).get("populated") == 0:
            return set()
    found: set[int] = set()
    for cg in all_cgroups(fs, top):
        found |= pids_in(fs, version, cg)
    return found


def kill_all(fs: CgroupFs, version: int, top: Path, failures: list[str]) -> None:
    """SIGKILL everything in ``top``'s subtree (``cgroup.kill`` on v2), never ourselves."""
    if version == 2 and fs.exists(top / "cgroup.kill"):
        try:
            fs.write(top / "cgroup.kill", "1")
            return
        except OSError as exc:
            failures.append(f"write 1 to {top}/cgroup.kill: {errname(exc)} {exc.strerror}")
    for cg in all_cgroups(fs, top):
        for pid in sorted(pids_in(fs, version, cg)):
            if pid == os.getpid():
                msg = f"{cg} holds the orchestrator itself (pid {pid}); not killing it"
                if msg not in failures:
                    failures.append(msg)
                continue
            try:
                fs.kill(pid)
            except ProcessLookupError:
                pass
            except OSError as exc:
                failures.append(f"SIGKILL pid {pid} in {cg}: {errname(exc)} {exc.strerror}")


def rmdir(fs: CgroupFs, path: Path, failures: list[str], tolerate_busy: bool) -> None:
    """Remove the empty cgroup ``path``; a busy one is a failure unless ``tolerate_busy``."""
    try:
        fs.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if tolerate_busy and exc.errno in (errno.EBUSY, errno.ENOTEMPTY, errno.EEXIST):
            return  # another VM's cgroup lives there
        failures.append(f"rmdir {path}: {errname(exc)} {exc.strerror}")


def drain(
    fs: CgroupFs, version: int, tops: list[Path], timeout_s: float, failures: list[str]
) -> None:
    """Kill everything in each of ``tops`` and wait (up to ``timeout_s``) until they are empty.

    On v1 each pass kills again (a process can fork between the read and the kill); pids still
    there at the deadline are listed in ``failures``.
    """
    for top in tops:
        kill_all(fs, version, top, failures)
    deadline = time.monotonic() + timeout_s
    pending = {top: populated(fs, version, top) for top in tops}
    while any(pending.values()) and time.monotonic() < deadline:
        time.sleep(0.02)
        for top in tops:
            if pending[top]:
                pending[top] = populated(fs, version, top)
                if pending[top] and version == 1:
                    kill_all(fs, version, top, failures)
    for top, pids in pending.items():
        if pids:
            failures.append(
                f"{top} still holds pids {sorted(pids)} after {timeout_s:g}s "
                "(uninterruptible sleep? check /proc/<pid>/stack)"
            )
