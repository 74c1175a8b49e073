"""The VMM process: spawning, identity, waiting, signalling and reaping.

Processes are spawned with ``posix_spawn`` and tracked through a pidfd, never by pid alone:
a pidfd always refers to the same process, so a recycled pid can never be signalled by
mistake. With ``--new-pid-ns`` the jailer forks the VMM and exits; we are a child
subreaper (``PR_SET_CHILD_SUBREAPER``), so the VMM is re-parented to us, stays our child and
is reaped by us, never left as a zombie of PID 1.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import pidfd as pidfds
from ..errors import UsageError
from ..libc import libc
from ..procfs import read_start_time

__all__ = ["UNKNOWN_EXIT", "ChildProcess", "become_subreaper", "read_start_time"]

_PR_SET_CHILD_SUBREAPER = 36
#: Exit code reported when another part of the program reaped our child first.
UNKNOWN_EXIT = 255
_subreaper_set = False


def become_subreaper() -> None:
    """Make this process the subreaper of its descendants (idempotent, Linux only)."""
    global _subreaper_set
    if _subreaper_set:
        return
    if libc().prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(err)}")
    _subreaper_set = True


class ChildProcess:
    """A child process of ours, watched through a pidfd.

    ``wait()`` returns the exit code as ``asyncio`` does: >= 0 for an exit status,
    ``-N`` for death by signal N.
    """

    def __init__(self, pid: int, *, stdin_fd: int | None = None) -> None:
        self.pid = pid
        #: Write end of the child's stdin pipe (Firecracker's serial input), or None.
        self.stdin_fd = stdin_fd
        self._start_time: int | None = None
        self._start_time_read = False
        self._pidfd: int | None = pidfds.open_pidfd(pid)
        if self._pidfd is None:
            raise ProcessLookupError(pid)
        self.returncode: int | None = None
        self._exited: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def start_time(self) -> int | None:
        """Start time in clock ticks since boot (with the pid, the process's identity).

        Read from /proc on first use, not per spawn: the jailer that forks the VMM never
        needs it. ``None`` if first asked after the process was reaped (its pid may be
        reused by then); until then the pid is still ours, even as a zombie.
        """
        if not self._start_time_read:
            self._start_time_read = True
            if self.returncode is None:
                self._start_time = read_start_time(self.pid)
        return self._start_time

    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        *,
        stdout_path: Path | None = None,
        stdout_fd: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> ChildProcess:
        """Start ``argv`` with stdout+stderr appended to ``stdout_path``, or on ``stdout_fd``
        (a VM's console terminal, :class:`~.consolelog.ConsolePump`).

        stdin is a pipe whose write end we keep (``stdin_fd``): Firecracker registers stdin as
        the serial console's input with epoll, which /dev/null does not support. The child
        gets its own process group, so a terminal's Ctrl-C reaches only us and we decide how
        to stop the VM.
        """
        if (stdout_path is None) == (stdout_fd is None):
            raise UsageError("ChildProcess.spawn: give stdout_path or stdout_fd (one of them)")
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        actions: list[tuple[Any, ...]] = [(os.POSIX_SPAWN_DUP2, read_end, 0)]
        if stdout_fd is not None:
            actions.append((os.POSIX_SPAWN_DUP2, stdout_fd, 1))
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
            actions.append((os.POSIX_SPAWN_OPEN, 1, str(stdout_path), flags, 0o600))
        actions.append((os.POSIX_SPAWN_DUP2, 1, 2))
        try:
            pid = os.posix_spawn(
                argv[0],
                list(argv),
                dict(env or {}),
                file_actions=actions,
                setpgroup=0,
                setsigdef=(signal.SIGINT, signal.SIGTERM, signal.SIGPIPE),
            )
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        return cls(pid, stdin_fd=write_end)

    @classmethod
    def adopt(cls, pid: int, *, stdin_fd: int | None = None) -> ChildProcess:
        """Watch ``pid``, which must already be our child (e.g. re-parented to us)."""
        return cls(pid, stdin_fd=stdin_fd)

    def take_stdin(self) -> int | None:
        """Hand over the stdin pipe (to the VMM the jailer forked, which shares it)."""
        fd, self.stdin_fd = self.stdin_fd, None
        return fd

    @property
    def pidfd(self) -> int | None:
        """The pidfd (readable once the process exits); ``None`` once it is reaped.

        ``None`` too while :meth:`wait` watches it: an event loop has one reader per file,
        and another reader would replace that one's."""
        return self._pidfd if self._exited is None else None

    @property
    def alive(self) -> bool:
        return self.poll() is None

    def poll(self) -> int | None:
        """Reap without blocking; the exit code once the process has exited, else None."""
        if self.returncode is not None:
            return self.returncode
        if self._pidfd is None:  # pragma: no cover - only None once returncode is set
            return self._set_returncode(UNKNOWN_EXIT)
        try:
            code = pidfds.reap_child(self._pidfd)
        except ChildProcessError:
            # Someone else reaped it (a foreign waitpid(-1)): the status is lost.
            return self._set_returncode(UNKNOWN_EXIT)
        return None if code is None else self._set_returncode(code)

    def _set_returncode(self, code: int) -> int:
        self.returncode = code
        if self.stdin_fd is not None:
            os.close(self.stdin_fd)
            self.stdin_fd = None
        if self._pidfd is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._exited is not None:
            self._exited.set()
        return code

    async def wait(self, timeout_s: float | None = None) -> int:
        """Wait for exit (reaping the child) and return its exit code.

        Raises ``TimeoutError`` if ``timeout_s`` passes first.
        """
        while (code := self.poll()) is None:
            if self._exited is None:
                loop = asyncio.get_running_loop()
                self._exited = asyncio.Event()
                if self._pidfd is not None:  # None only once exited, which poll() saw
                    loop.add_reader(self._pidfd, self.poll)
                    self._loop = loop
            async with asyncio.timeout(timeout_s):
                await self._exited.wait()
        return code

    def send_signal(self, sig: int) -> bool:
        """Signal the process through its pidfd; False if it has already exited."""
        if self._pidfd is None or self.returncode is not None:
            return False
        return pidfds.send_signal(self._pidfd, sig)

    def kill(self) -> bool:
        return self.send_signal(signal.SIGKILL)

    def close(self) -> None:
        """Release the pidfd; the process must have been reaped."""
        if self.returncode is None and self._pidfd is not None:
            raise UsageError(f"process {self.pid} has not exited yet: stop it before close()")
