"""Signalling, waiting for and reaping processes through pidfds. One home.

A pidfd always refers to the process it was opened for: once open, a recycled pid can no
longer be hit. The pattern everywhere is therefore *open, then check identity (pid + start
time, see :mod:`ironclaw_orchestrator.procfs`), then signal through the pidfd*.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import signal
from collections.abc import Iterator
from pathlib import Path

from .procfs import PROC, is_alive

__all__ = [
    "KillOutcome",
    "exit_code_of",
    "kill_and_reap",
    "open_pidfd",
    "opened",
    "reap",
    "reap_child",
    "send_signal",
    "wait_exit",
    "wait_exit_async",
]

KillOutcome = str  # "killed" | "gone"


def open_pidfd(pid: int) -> int | None:
    """A pidfd for ``pid``, or ``None`` if there is no such process."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return None
        raise


@contextlib.contextmanager
def opened(pid: int) -> Iterator[int | None]:
    """``with opened(pid) as fd:`` a pidfd (or ``None``), closed afterwards."""
    fd = open_pidfd(pid)
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def send_signal(pidfd: int, sig: int) -> bool:
    """Signal the process; ``False`` if it has already exited."""
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        return False
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return False
        raise
    return True


def exit_code_of(result: os.waitid_result) -> int:
    """asyncio's convention: the exit status, or ``-N`` for death by signal N."""
    if result.si_code == os.CLD_EXITED:
        return result.si_status
    return -result.si_status


def reap_child(pidfd: int) -> int | None:
    """Reap our child if it has exited: its exit code; ``None`` while it runs.

    Raises ``ChildProcessError`` if it is not (or no longer) our child.
    """
    result = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
    return None if result is None else exit_code_of(result)


def reap(pidfd: int) -> int | None:
    """Reap the process if it is an exited child of ours: its exit code, else ``None``.

    ``None`` also when it is not our child (nothing to reap) or still running.
    """
    try:
        return reap_child(pidfd)
    except ChildProcessError:
        return None


def wait_exit(pidfd: int, timeout_s: float) -> bool:
    """Block until the process exits (the pidfd becomes readable); ``False`` on timeout."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout_s) * 1000))


async def wait_exit_async(pidfd: int, timeout_s: float | None) -> bool:
    """Wait on the event loop until the process exits; ``False`` on timeout."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_reader(pidfd, done.set)
    try:
        async with asyncio.timeout(timeout_s):
            await done.wait()
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)


def kill_and_reap(
    pid: int, start_time: int, timeout_s: float = 5.0, proc: Path = PROC
) -> KillOutcome:
    """SIGKILL ``pid`` if it is still the process started at ``start_time``; wait; reap.

    Returns ``"killed"`` or ``"gone"`` (it had exited; reaped if it was our zombie); raises
    ``OSError`` (ETIMEDOUT) if it survives ``timeout_s``.
    """
    with opened(pid) as fd:
        if fd is None:
            return "gone"
        # The pidfd pins the process: if the start time matches now, we signal the right one.
        if not is_alive(pid, start_time, proc):
            reap(fd)
            return "gone"
        send_signal(fd, signal.SIGKILL)
        if not wait_exit(fd, timeout_s):
            raise OSError(
                errno.ETIMEDOUT,
                f"pid {pid} is still alive {timeout_s:g}s after SIGKILL (uninterruptible "
                f"sleep? see /proc/{pid}/stack)",
            )
        reap(fd)
        return "killed"
