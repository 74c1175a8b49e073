"""Guest side: running commands for the agent (standard library only, Python 3.7+).

A :class:`Command` is one process started in a process group (session) of its own. It is
finished when that process exits, not when its pipes close: a background child that keeps
stdout open cannot hold the command up. Its output goes into a bounded log per stream
(the first ``output_limit`` bytes are kept, the rest counted and dropped) that any number of
connections read from their own offsets, which is what makes re-attaching after a
disconnect possible. While a reader is attached and more than :data:`WINDOW` bytes ahead of
it are unsent, the agent stops reading the pipe, so a fast producer waits for a slow client
(back-pressure) instead of filling memory; with nobody attached the pipe is drained into the
log so the process never blocks on a reader that is gone.

A timeout kills the whole process group with SIGKILL and is reported as ``timed_out``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import tempfile
import time
from collections import OrderedDict
from typing import IO, Any

#: Unsent bytes ahead of the slowest attached reader before the pipe is no longer read.
WINDOW = 1024 * 1024
#: Default bytes kept per stream (stdout, stderr) of one command.
DEFAULT_OUTPUT_LIMIT = 16 * 1024 * 1024
MAX_OUTPUT_LIMIT = 256 * 1024 * 1024
#: Finished commands remembered (for re-attach and idempotent retries); oldest go first,
#: also once their kept output exceeds MAX_KEPT_BYTES (the guest's memory is small).
KEEP_FINISHED = 64
MAX_KEPT_BYTES = 64 * 1024 * 1024
READ_SIZE = 64 * 1024
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class SpawnError(Exception):
    """The command could not be started (bad cwd, no such program, unknown user)."""


class OutputLog:
    """The first ``limit`` bytes of one output stream, plus a count of what was dropped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.dropped = 0

    @property
    def truncated(self) -> bool:
        return self.dropped > 0

    def append(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if room > 0:
            self.data += chunk[:room]
        self.dropped += max(0, len(chunk) - max(room, 0))

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.data[offset : offset + size])


class Cursor:
    """How far one attached connection has sent each stream."""

    def __init__(self, stdout: int = 0, stderr: int = 0) -> None:
        self.offsets = {1: stdout, 2: stderr}


class Command:
    """One running (or finished) command and its output logs."""

    def __init__(self, key: str | None, argv: list[str], output_limit: int) -> None:
        self.id = "x" + secrets.token_hex(8)
        self.key = key
        self.argv = argv
        self.logs = {1: OutputLog(output_limit), 2: OutputLog(output_limit)}
        self.cursors: list[Cursor] = []
        self.result: dict[str, Any] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._loop = asyncio.get_running_loop()
        self._fds: dict[int, int] = {}
        self._paused: dict[int, bool] = {}
        self._changed = self._loop.create_future()
        self._started = 0.0
        self._timed_out = False
        self._timer: asyncio.TimerHandle | None = None
        self._pidfd = -1

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    # ------------------------------------------------------------------ start
    def start(
        self,
        env: dict[str, str] | None,
        cwd: str | None,
        user: str | None,
        stdin: IO[bytes] | None,
        timeout_s: float | None,
    ) -> None:
        full_env = dict(os.environ)
        full_env.setdefault("PATH", DEFAULT_PATH)
        kwargs: dict[str, Any] = {}
        if user is not None:
            kwargs, home = _user_kwargs(user)
            full_env.update(home)
        if env:
            full_env.update(env)
        self._started = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=stdin if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                env=full_env,
                start_new_session=True,  # its own process group: a timeout kills all of it
                close_fds=True,
                **kwargs,
            )
        except TypeError as exc:  # user=/group= need Python 3.9
            raise SpawnError(f"cannot run {self.argv[0]!r} as another user here: {exc}") from None
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            raise SpawnError(f"cannot run {self.argv[0]!r}: {exc}") from None
        assert self.proc.stdout is not None and self.proc.stderr is not None
        for fd, pipe in ((1, self.proc.stdout), (2, self.proc.stderr)):
            os.set_blocking(pipe.fileno(), False)
            self._fds[fd] = pipe.fileno()
            self._paused[fd] = False
            self._loop.add_reader(pipe.fileno(), self._on_readable, fd)
        self._watch_exit()
        if timeout_s is not None:
            self._timer = self._loop.call_later(timeout_s, self._on_timeout)

    def _watch_exit(self) -> None:
        assert self.proc is not None
        try:
            self._pidfd = os.pidfd_open(self.proc.pid)  # type: ignore[attr-defined,unused-ignore]
        except (AttributeError, OSError):
            self._loop.create_task(self._wait_in_thread())
            return
        self._loop.add_reader(self._pidfd, self._on_exit)

    async def _wait_in_thread(self) -> None:
        assert self.proc is not None
        await self._loop.run_in_executor(None, self.proc.wait)
        self._on_exit()

    # ------------------------------------------------------------------ output
    def _on_readable(self, fd: int) -> None:
        try:
            chunk = os.read(self._fds[fd], READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close_pipe(fd)
        else:
            self.logs[fd].append(chunk)
            if self._backlog(fd) >= WINDOW:
                self._loop.remove_reader(self._fds[fd])
                self._paused[fd] = True
        self._notify()

    def _backlog(self, fd: int) -> int:
        if not self.cursors:
            return 0
        return len(self.logs[fd].data) - min(c.offsets[fd] for c in self.cursors)

    def cursor_moved(self) -> None:
        """Called by senders after they sent: resume reading a pipe paused for them."""
        for fd, paused in list(self._paused.items()):
            if paused and fd in self._fds and self._backlog(fd) < WINDOW:
                self._paused[fd] = False
                self._loop.add_reader(self._fds[fd], self._on_readable, fd)

    def _close_pipe(self, fd: int) -> None:
        pipe_fd = self._fds.pop(fd, None)
        if pipe_fd is None:
            return
        if not self._paused.pop(fd, False):
            self._loop.remove_reader(pipe_fd)
        os.close(pipe_fd)

    def _drain_pipes(self) -> None:
        """Take what the pipes hold now; stop at the first read that would block."""
        for fd in list(self._fds):
            while fd in self._fds:
                try:
                    chunk = os.read(self._fds[fd], READ_SIZE)
                except BlockingIOError:
                    break
                except OSError:
                    chunk = b""
                if not chunk:
                    self._close_pipe(fd)
                    break
                self.logs[fd].append(chunk)
            self._close_pipe(fd)

    # ------------------------------------------------------------------ exit
    def _on_timeout(self) -> None:
        if self.result is None and self.proc is not None:
            self._timed_out = True
            self.kill(signal.SIGKILL)

    def kill(self, signum: int) -> None:
        """Signal the command's whole process group."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signum)

    def _on_exit(self) -> None:
        assert self.proc is not None
        if self.result is not None:
            return
        code = self.proc.poll()
        if code is None:
            return  # pidfd readable yet not reapable: wait for the next wake-up
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if self._timer is not None:
            self._timer.cancel()
        if self._timed_out:
            self.kill(signal.SIGKILL)  # what is left of the group (pipe holders included)
        self._drain_pipes()
        sig = -code if code < 0 else None
        self.result = {
            "exit_code": 128 + sig if sig is not None else code,
            "signal": sig,
            "timed_out": self._timed_out,
            "duration_s": round(time.monotonic() - self._started, 6),
            "stdout_dropped": self.logs[1].dropped,
            "stderr_dropped": self.logs[2].dropped,
        }
        self._notify()

    # ------------------------------------------------------------------ waiting
    def _notify(self) -> None:
        if not self._changed.done():
            self._changed.set_result(None)
        self._changed = self._loop.create_future()

    async def changed(self) -> None:
        """Wait until more output arrived or the command finished."""
        await asyncio.shield(self._changed)

    def waiter(self) -> asyncio.Future[None]:
        return self._changed


def _user_kwargs(user: str) -> tuple[dict[str, Any], dict[str, str]]:
    import pwd

    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError):
        raise SpawnError(f"no user {user!r} in the guest (see /etc/passwd)") from None
    kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    env = {"HOME": entry.pw_dir, "USER": entry.pw_name, "LOGNAME": entry.pw_name}
    return kwargs, env


class CommandTable:
    """Commands by id and by idempotency key; finished ones are forgotten oldest first."""

    def __init__(self) -> None:
        self.by_id: OrderedDict[str, Command] = OrderedDict()
        self.by_key: dict[str, Command] = {}

    def find_key(self, key: str | None) -> Command | None:
        return self.by_key.get(key) if key else None

    def add(self, cmd: Command) -> None:
        self.by_id[cmd.id] = cmd
        if cmd.key:
            self.by_key[cmd.key] = cmd
        self.prune()

    def prune(self) -> None:
        """Forget the oldest finished commands beyond the count and memory bounds."""
        finished = [c for c in self.by_id.values() if c.result is not None]
        kept = sum(len(c.logs[1].data) + len(c.logs[2].data) for c in finished)
        count = len(finished)
        for old in finished:
            if count <= KEEP_FINISHED and kept <= MAX_KEPT_BYTES:
                break
            count -= 1
            kept -= len(old.logs[1].data) + len(old.logs[2].data)
            del self.by_id[old.id]
            if old.key:
                self.by_key.pop(old.key, None)

    def running(self) -> int:
        return sum(1 for c in self.by_id.values() if c.result is None)


def stdin_file() -> IO[bytes]:
    """An anonymous file to collect a command's stdin in before it starts."""
    return tempfile.TemporaryFile()
