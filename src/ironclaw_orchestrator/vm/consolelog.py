"""A VM's console within a byte budget: the guest's serial output and firecracker's own log.

Firecracker writes the serial console to its stdout and its log to stderr (no
``--log-path``). Both are one pseudo-terminal in raw mode, read by the process that owns the
VM (its event loop: one ``read`` per wake-up, no thread) and written to ``console.log`` in
the VM's run directory, so a guest that floods its serial port costs the host at most
``console_limit_bytes`` of disk (or of memory, where ``/run`` is a tmpfs):

* ``console.log`` holds the newest output, at most half the budget (less a marker line);
* when it is full it becomes ``console.log.1`` (copied behind a marker line, in the kernel)
  and the previous ``console.log.1`` is dropped. From the second rotation on,
  ``console.log.1`` starts with :func:`marker_line`, which says how many bytes were dropped
  before it, so ``cat console.log.1 console.log`` shows exactly where output is missing;
* each rotation gives ``console.log`` a new inode, so a reader holding the old one reads it
  to its end (:mod:`.consoleread` follows across rotations like ``tail -F``).

Why a pseudo-terminal and not a pipe (both verified with Firecracker v1.0.0): both ends are
non-blocking, so when nobody reads (the owner's loop is busy) the VMM's writes fail with
``EAGAIN`` and it drops serial bytes, never stalling a vCPU or its API thread (Firecracker
also sets its stdout non-blocking itself and ignores failed writes). But when the owner
dies, a pipe without a reader raises SIGPIPE in the VMM, and Firecracker's SIGPIPE handler
logs into that same broken pipe, re-entering its logger: the VMM dies (SIGILL), at random.
The jailer resets the signal mask, so SIGPIPE cannot be blocked for it. A terminal whose
master side is gone fails writes with ``EIO`` and sends no signal (it is nobody's
controlling terminal), so the VMM outlives its owner like any orphan, for ``ironclaw gc``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import tty
import weakref
from pathlib import Path

from .config import (
    DEFAULT_CONSOLE_LIMIT_BYTES,
    MAX_CONSOLE_LIMIT_BYTES,
    MIN_CONSOLE_LIMIT_BYTES,
)

__all__ = [
    "DEFAULT_CONSOLE_LIMIT_BYTES",
    "MARKER_PREFIX",
    "MARKER_RESERVE",
    "MAX_CONSOLE_LIMIT_BYTES",
    "MIN_CONSOLE_LIMIT_BYTES",
    "ConsoleLog",
    "ConsolePump",
    "drain_pending",
    "marker_line",
    "parse_marker",
    "rotated_path",
]

log = logging.getLogger(__name__)

#: Room kept for the marker line at the top of ``console.log.1``.
MARKER_RESERVE = 256
MARKER_PREFIX = "[ironclaw] console output dropped here:"
_MARKER = re.compile(
    re.escape(MARKER_PREFIX) + r" (\d+) bytes .* \(console_limit_bytes=(\d+), rotation (\d+)\)"
)
#: At most this much per read (one read per wake-up).
_CHUNK = 65536


def rotated_path(path: Path) -> Path:
    """``console.log.1`` for ``console.log``."""
    return path.with_name(path.name + ".1")


def marker_line(dropped: int, limit: int, rotation: int) -> bytes:
    """The line at the top of ``console.log.1`` once older output has been dropped."""
    line = (
        f"{MARKER_PREFIX} {dropped} bytes of older output were discarded to keep this VM's "
        f"console within its budget (console_limit_bytes={limit}, rotation {rotation})\n"
    ).encode()
    assert len(line) <= MARKER_RESERVE
    return line


def parse_marker(first_line: bytes) -> tuple[int, int] | None:
    """``(dropped bytes, rotation)`` from a marker line, else ``None``."""
    m = _MARKER.match(first_line.decode(errors="replace"))
    return (int(m.group(1)), int(m.group(3))) if m else None


class ConsoleLog:
    """Writes console output to ``path`` and ``path.1`` within ``limit`` bytes in all.

    Used by one writer (:class:`ConsolePump`); pure file work, no event loop.
    """

    def __init__(self, path: Path, limit: int = DEFAULT_CONSOLE_LIMIT_BYTES) -> None:
        if not MIN_CONSOLE_LIMIT_BYTES <= limit <= MAX_CONSOLE_LIMIT_BYTES:
            raise ValueError(
                f"console_limit_bytes={limit} is out of range: use {MIN_CONSOLE_LIMIT_BYTES}.."
                f"{MAX_CONSOLE_LIMIT_BYTES}"
            )
        self.path = path
        self.limit = limit
        #: Largest ``console.log``; ``console.log.1`` is that plus its marker line.
        self.segment = (limit - MARKER_RESERVE) // 2
        #: Bytes dropped so far (whole rotated-out segments and writes that failed).
        self.dropped = 0
        self.rotations = 0
        self._fd: int | None = self._open(path, os.O_CREAT)
        self._size = os.fstat(self._fd).st_size
        self._previous = 0  # bytes of output in console.log.1 (its marker not counted)
        self._failed = False

    @staticmethod
    def _open(path: Path, flags: int) -> int:
        return os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW | flags, 0o600)

    def write(self, data: bytes) -> None:
        """Append ``data``, rotating as often as the budget needs; never raises OSError.

        If the files cannot be written (disk full, ...) the output is counted as dropped.
        """
        view = memoryview(data)
        try:
            while view and self._fd is not None:
                if self._size >= self.segment:
                    self._rotate()
                part = view[: self.segment - self._size]
                while part:
                    written = os.write(self._fd, part)
                    self._size += written
                    part, view = part[written:], view[written:]
        except OSError as exc:
            self.dropped += len(view)
            if not self._failed:
                self._failed = True
                log.warning("console %s: output dropped, writing failed: %s", self.path, exc)

    def _rotate(self) -> None:
        """``console.log`` -> ``console.log.1`` (behind a marker), a new empty ``console.log``.

        Never more than the budget on disk: the old ``.1`` goes first, and the new one is
        at most a segment plus its marker.
        """
        assert self._fd is not None
        old = rotated_path(self.path)
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
        if self.rotations:
            self.dropped += self._previous
        tmp = old.with_name(old.name + ".tmp")
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                      0o600)  # fmt: skip
        try:
            if self.rotations:
                os.write(out, marker_line(self.dropped, self.limit, self.rotations + 1))
            _copy(self._fd, out, self._size)
        finally:
            os.close(out)
        os.rename(tmp, old)
        new = self.path.with_name(self.path.name + ".new")
        fd = self._open(new, os.O_CREAT | os.O_TRUNC)
        os.rename(new, self.path)
        os.close(self._fd)
        self._fd = fd
        self._previous, self._size = self._size, 0
        self.rotations += 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _copy(src: int, dst: int, count: int) -> None:
    """``count`` bytes from the start of ``src`` to ``dst``, in the kernel where possible."""
    offset = 0
    try:
        while offset < count:
            sent = os.sendfile(dst, src, offset, count - offset)
            if sent == 0:
                return
            offset += sent
    except OSError:
        while offset < count:
            chunk = os.pread(src, min(_CHUNK, count - offset), offset)
            if not chunk:
                return
            os.write(dst, chunk)
            offset += len(chunk)


#: Live pumps by console path, so that a tail read first takes in what is still unread.
_live: weakref.WeakValueDictionary[str, ConsolePump] = weakref.WeakValueDictionary()


class ConsolePump:
    """The terminal a VMM writes its stdout/stderr to, and its reader into a
    :class:`ConsoleLog`.

    Give ``write_fd`` to the child as fds 1 and 2, then call :meth:`child_started`;
    :meth:`attach` reads it from the running event loop; :meth:`close` once the VMM exited.
    """

    def __init__(self, path: Path, limit: int = DEFAULT_CONSOLE_LIMIT_BYTES) -> None:
        self.log = ConsoleLog(path, limit)
        # openpty() opens the terminal side with O_NOCTTY: it never becomes a controlling
        # terminal (of a supervisor, a session leader), so closing it signals nobody.
        read_fd, write_fd = os.openpty()
        try:
            tty.setraw(write_fd)  # the bytes as written: no CR added, no echo, no signals
            for fd in (read_fd, write_fd):
                os.set_blocking(fd, False)
        except BaseException:
            os.close(read_fd)
            os.close(write_fd)
            raise
        self._read_fd: int | None = read_fd
        self.write_fd_or_none: int | None = write_fd
        self._loop: asyncio.AbstractEventLoop | None = None
        _live[str(path)] = self

    @property
    def path(self) -> Path:
        return self.log.path

    @property
    def write_fd(self) -> int:
        fd = self.write_fd_or_none
        if fd is None:
            raise ValueError(f"console {self.path}: the terminal was handed over")
        return fd

    @property
    def dropped(self) -> int:
        """Bytes of console output dropped to stay within the budget."""
        return self.log.dropped

    def child_started(self) -> None:
        """The child holds the terminal now: close ours, so its exit reads as the end."""
        if self.write_fd_or_none is not None:
            os.close(self.write_fd_or_none)
            self.write_fd_or_none = None

    def attach(self) -> None:
        """Read the terminal from the running loop (again, if the previous loop is gone)."""
        loop = asyncio.get_running_loop()
        if self._read_fd is None or self._loop is loop:
            return
        self._detach()
        loop.add_reader(self._read_fd, self._read_once)
        self._loop = loop

    def _detach(self) -> None:
        if self._loop is not None and not self._loop.is_closed() and self._read_fd is not None:
            self._loop.remove_reader(self._read_fd)
        self._loop = None

    def _read_once(self) -> int:
        """One read into the log; 0 when nothing is there (the end closes the terminal)."""
        if self._read_fd is None:
            return 0
        try:
            data = os.read(self._read_fd, _CHUNK)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            data = b""  # EIO: every holder of the terminal side is gone (the VMM exited)
        if not data:
            self._detach()
            os.close(self._read_fd)
            self._read_fd = None
            return 0
        self.log.write(data)
        return len(data)

    def drain(self) -> None:
        """Take in everything the terminal holds now (before reading the files)."""
        while self._read_once():
            pass

    def close(self) -> None:
        """Drain and close the terminal and the files (the VMM must have exited)."""
        self.drain()
        self._detach()
        if self._read_fd is not None:
            os.close(self._read_fd)
            self._read_fd = None
        self.child_started()
        self.log.close()
        if _live.get(str(self.path)) is self:
            del _live[str(self.path)]


def drain_pending(path: Path) -> None:
    """Take in what the VMM wrote to the console at ``path`` and was not read yet (if a
    pump of this process reads it), so that the files are up to date."""
    pump = _live.get(str(path))
    if pump is not None:
        pump.drain()
