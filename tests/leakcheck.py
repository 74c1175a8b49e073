"""Find what a test left running or lying around: child processes, threads, temp files.

Used by ``tests/conftest.py``. A process counts as ours when it descends from the test
process (which is made a child subreaper, so an orphan, like the ``sleep`` of a killed
shell script, is re-parented to it rather than to init), or when its environment carries
this session's :data:`TOKEN_ENV` (a process that started a new session and was re-parented
elsewhere; other engineers' concurrent runs carry other tokens). Temp files count when they
appear in the session's private ``$TMPDIR``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

TOKEN_ENV = "IRONCLAW_TEST_SESSION"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, order=True)
class ProcKey:
    pid: int
    create_time: float


def our_processes(token: str, since: float) -> dict[ProcKey, str]:
    """Live (non-zombie) processes started at or after ``since`` (seconds since boot) that
    are ours: descendants of this process, or carrying ``token`` in their environment."""
    found: dict[ProcKey, str] = {}
    me = os.getpid()
    parents: dict[int, int] = {}
    recent: list[str] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        stat = _stat(entry)
        if stat is None:
            continue
        state, ppid, start = stat
        parents[int(entry)] = ppid
        if start >= since and state not in ("Z", "X"):
            recent.append(entry)
    needle = f"{TOKEN_ENV}={token}".encode()
    for entry in recent:
        pid = int(entry)
        if not _descends_from(pid, me, parents):
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if needle not in environ.split(b"\0"):
                continue
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            found[ProcKey(pid, proc.create_time())] = _describe(proc)
    return found


def _stat(pid: str) -> tuple[str, int, float] | None:
    """State, parent pid and start time (seconds since boot) from ``/proc/<pid>/stat``."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1]), int(fields[19]) / _CLK_TCK


def _descends_from(pid: int, ancestor: int, parents: dict[int, int]) -> bool:
    for _ in range(64):
        pid = parents.get(pid, 0)
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
    return False


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid}: {' '.join(proc.cmdline()) or proc.name()}"
    except psutil.Error:
        return f"pid {proc.pid}"


def seconds_since_boot() -> float:
    """Now, on the clock of process start times (``/proc/uptime``)."""
    return float(Path("/proc/uptime").read_text().split()[0])


def wait_gone(keys: set[ProcKey], token: str, since: float, grace_s: float) -> dict[ProcKey, str]:
    """Wait up to ``grace_s`` for ``keys`` to end; return those still running."""
    deadline = time.monotonic() + grace_s
    while True:
        alive = {k: v for k, v in our_processes(token, since).items() if k in keys}
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def kill(keys: set[ProcKey]) -> None:
    """SIGKILL each (if still the same process) and reap those that are our children."""
    procs = []
    for key in keys:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(key.pid)
            if proc.create_time() == key.create_time:
                proc.send_signal(signal.SIGKILL)
                procs.append(proc)
    psutil.wait_procs(procs, timeout=5)


def join_threads(threads: set[threading.Thread], grace_s: float) -> list[threading.Thread]:
    """Those of ``threads`` still alive after waiting up to ``grace_s`` in all."""
    deadline = time.monotonic() + grace_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [t for t in threads if t.is_alive()]


def tmp_entries(tmpdir: Path) -> set[str]:
    try:
        return set(os.listdir(tmpdir))
    except FileNotFoundError:
        return set()


def reap_zombies() -> list[int]:
    """Reap exited children nobody waited for (orphans re-parented to us, the subreaper)."""
    reaped = []
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.Error, ChildProcessError):
                if child.status() == psutil.STATUS_ZOMBIE:
                    os.waitpid(child.pid, os.WNOHANG)
                    reaped.append(child.pid)
    return reaped
