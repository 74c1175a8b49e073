"""Reading ``/proc``: process identity, names, root/cwd links, cgroup membership. One home.

A process is identified by its pid *and* its start time (``/proc/<pid>/stat`` field 22): a
recycled pid has another start time, so a record naming ``(pid, start time)`` is never
mistaken for an unrelated process. Every function takes ``proc`` so tests can point it at a
fake tree. Nothing here writes or signals (see :mod:`ironclaw_orchestrator.pidfd`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PROC",
    "ProcStat",
    "all_pids",
    "boot_time",
    "cgroup_index",
    "cgroup_paths",
    "children_of",
    "describe_process",
    "is_alive",
    "pids_using_dir",
    "read_cmdline",
    "read_comm",
    "read_start_time",
    "read_stat",
]

PROC = Path("/proc")
_DEAD_STATES = frozenset({"Z", "X", "x"})


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` we use."""

    pid: int
    comm: str
    state: str
    ppid: int
    #: Clock ticks since boot.
    start_time: int

    @property
    def exited(self) -> bool:
        """A zombie (exited, not yet reaped) or dead process."""
        return self.state in _DEAD_STATES


def read_stat(pid: int, proc: Path = PROC) -> ProcStat | None:
    """Parse ``/proc/<pid>/stat``; ``None`` if the process does not exist (or is unreadable)."""
    try:  # one open and one read (no pathlib, no text layer): this runs on every start
        fd = os.open(f"{proc}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, 4096).decode(errors="replace")
        finally:
            os.close(fd)
    except OSError:
        return None
    # The command name may hold spaces and ')': it runs from the first '(' to the last ')'.
    open_at, close_at = data.find("("), data.rfind(")")
    fields = data[close_at + 2 :].split()
    try:
        return ProcStat(
            pid=pid,
            comm=data[open_at + 1 : close_at],
            state=fields[0],
            ppid=int(fields[1]),
            start_time=int(fields[19]),
        )
    except (IndexError, ValueError):
        return None


def read_start_time(pid: int, proc: Path = PROC) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or ``None`` if it does not exist."""
    st = read_stat(pid, proc)
    return None if st is None else st.start_time


def is_alive(pid: int | None, start_time: int | None, proc: Path = PROC) -> bool:
    """True if ``pid`` is still the process that started at ``start_time`` and has not exited.

    A recycled pid has another start time; a zombie counts as dead. Without a start time
    there is no way to be sure, so the answer is ``False``.
    """
    if pid is None or start_time is None or pid <= 0:
        return False
    st = read_stat(pid, proc)
    return st is not None and st.start_time == start_time and not st.exited


def read_comm(pid: int, proc: Path = PROC) -> str | None:
    try:
        return (proc / str(pid) / "comm").read_text().rstrip("\n")
    except OSError:
        return None


def read_cmdline(pid: int, proc: Path = PROC) -> list[str]:
    """The argument vector (empty for kernel threads, zombies, or a vanished process)."""
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]] if raw else []


def all_pids(proc: Path = PROC) -> list[int]:
    """Every pid visible in ``proc``, ascending."""
    try:
        return sorted(int(e) for e in os.listdir(proc) if e.isdigit())
    except OSError:
        return []


def children_of(ppid: int, proc: Path = PROC) -> list[int]:
    """Pids whose parent is ``ppid`` (alive or zombie)."""
    out = []
    for pid in all_pids(proc):
        st = read_stat(pid, proc)
        if st is not None and st.ppid == ppid:
            out.append(pid)
    return out


def _dir_ids(top: Path) -> set[tuple[int, int]]:
    """``(st_dev, st_ino)`` of ``top`` and every directory beneath it (no symlink followed)."""
    ids: set[tuple[int, int]] = set()
    for dirpath, _dirs, _files in os.walk(top):
        with contextlib.suppress(OSError):
            st = os.lstat(dirpath)
            ids.add((st.st_dev, st.st_ino))
    return ids


def _fd_links(pid: int, proc: Path) -> Iterator[str]:
    base = proc / str(pid) / "fd"
    with contextlib.suppress(OSError):
        for fd in os.listdir(base):
            with contextlib.suppress(OSError):  # closed meanwhile
                yield os.readlink(base / fd)


def pids_using_dir(path: Path, proc: Path = PROC, *, fds: bool = True) -> list[int]:
    """Pids whose root or cwd (or, with ``fds``, an open file) is ``path`` or beneath it.

    Root and cwd are compared by device and inode, not by link text: a jailed VMM lives in
    a mount namespace of its own, where its root link reads ``/``. So this finds the VMM of
    a jail whatever started it: with or without a PID namespace, pid file or record.
    """
    ids = _dir_ids(path)
    if not ids:
        return []
    top = str(path).rstrip("/") or "/"
    found = []
    for pid in all_pids(proc):
        hit = False
        for name in ("root", "cwd"):
            try:
                st = os.stat(proc / str(pid) / name)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in ids:
                hit = True
                break
        if not hit and fds:
            hit = any(x == top or x.startswith(top + "/") for x in _fd_links(pid, proc))
        if hit:
            found.append(pid)
    return found


def cgroup_paths(pid: int, proc: Path = PROC) -> list[str]:
    """The cgroup of ``pid`` in every hierarchy (``/proc/<pid>/cgroup``, path part only)."""
    try:
        text = (proc / str(pid) / "cgroup").read_text()
    except OSError:
        return []
    return [line.split(":", 2)[2] for line in text.splitlines() if line.count(":") >= 2]


def cgroup_index(proc: Path = PROC) -> dict[str, list[int]]:
    """Every cgroup path component -> the pids in a cgroup of that name (or beneath it).

    Built from every process's own membership rather than one directory's ``cgroup.procs``,
    so a VM whose cgroups live under a parent we do not know is still found.
    """
    index: dict[str, set[int]] = {}
    for pid in all_pids(proc):
        for path in cgroup_paths(pid, proc):
            for part in path.split("/"):
                if part:
                    index.setdefault(part, set()).add(pid)
    return {k: sorted(v) for k, v in index.items()}


def boot_time(proc: Path = PROC) -> float | None:
    try:
        for line in (proc / "stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def describe_process(pid: int, start_time: int | None) -> str:
    """``pid N since <local time>``, for messages."""
    boot = boot_time()
    if start_time is None or boot is None:
        return f"pid {pid}"
    started = boot + start_time / os.sysconf("SC_CLK_TCK")
    return f"pid {pid} since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}"
