"""Reading a VM's console across rotations (see :mod:`.consolelog`): the tail quoted in
error messages, a follower for ``ironclaw vm logs -f`` and the host agent's log stream, and
the dropped-bytes count as the files say it, for any process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from ..errors import output_tail
from .consolelog import (
    MARKER_RESERVE,
    drain_pending,
    parse_marker,
    rotated_path,
)

__all__ = ["SKIPPED_NOTE", "ConsoleFollower", "dropped_bytes", "read_tail"]

#: At most this much per read.
_CHUNK = 65536


def _first_line(path: Path) -> bytes | None:
    """The first line of ``path`` (at most a marker's length), ``None`` if it is missing."""
    try:
        with open(path, "rb") as f:
            return f.readline(MARKER_RESERVE)
    except OSError:
        return None


def dropped_bytes(path: Path) -> int:
    """Bytes of console output dropped so far, read from the files (any process can)."""
    first = _first_line(rotated_path(path))
    parsed = parse_marker(first) if first else None
    return parsed[0] if parsed else 0


def _rotation(path: Path) -> int:
    """How many times ``path`` has been rotated, as the files say."""
    first = _first_line(rotated_path(path))
    if first is None:
        return 0
    parsed = parse_marker(first)
    return parsed[1] if parsed else 1


def read_tail(path: Path | None, lines: int = 20, max_bytes: int = 16384) -> str:
    """The last ``lines`` lines of a console (across a rotation), for error messages."""
    if path is None:
        return ""
    drain_pending(path)
    data = _tail_bytes(path, max_bytes)
    if data is None:
        return ""
    if len(data) < max_bytes and data.count(b"\n") <= lines:
        data = (_tail_bytes(rotated_path(path), max_bytes - len(data)) or b"") + data
    return output_tail(data.decode(errors="replace"), lines)


def _tail_bytes(path: Path, max_bytes: int) -> bytes | None:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - max_bytes))
            return f.read(max_bytes)
    except OSError:
        return None


class ConsoleFollower:
    """Reads a console from its oldest kept byte on and keeps up across rotations.

    :meth:`read` returns what is new (``b""`` if nothing). It holds the file it reads, so a
    rotation loses nothing: it reads the old inode to its end, then goes on with the new
    ``console.log``. Only if the files rotated more than once between two reads can output
    be missing, and then a line says so. Works on any growing file (one never rotated too).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = None
        self._ino = -1
        self._rotation = 0
        #: What to read next: a file (and whether to skip its marker line), or a note.
        self._queue: list[tuple[Path, bool] | bytes] = []

    def _start(self) -> None:
        self._rotation = _rotation(self.path)
        if self._rotation:
            self._queue.append((rotated_path(self.path), False))
        self._queue.append((self.path, False))

    def _open(self, path: Path, skip_marker: bool) -> None:
        try:
            f = open(path, "rb")  # noqa: SIM115 - held across calls, closed in close()
        except OSError:
            return
        self.close()
        self._file = f
        if path == self.path:
            self._ino = os.fstat(f.fileno()).st_ino
        if skip_marker and parse_marker(f.readline(MARKER_RESERVE)) is None:
            f.seek(0)

    def read(self, limit: int = 1 << 20) -> bytes:
        """Up to about ``limit`` new bytes."""
        if self._file is None and not self._queue:
            self._start()
        out: list[bytes] = []
        got = 0
        while got < limit:
            chunk = self._file.read(_CHUNK) if self._file is not None else b""
            if not chunk and self._queue:
                item = self._queue.pop(0)
                if isinstance(item, bytes):
                    chunk = item
                else:
                    self._open(*item)
                    continue
            if not chunk:
                if self._file is None or not self._rotated():
                    break
                continue
            out.append(chunk)
            got += len(chunk)
        return b"".join(out)

    def _rotated(self) -> bool:
        """If ``console.log`` is a new file, queue what to read next and say True."""
        try:
            ino = os.stat(self.path).st_ino
        except OSError:
            return False  # gone with its VM: what we hold is all there is
        if ino == self._ino or self._file is None or self._file.name != str(self.path):
            return False
        rotation = _rotation(self.path)
        if rotation > self._rotation + 1:
            # The segment after ours is in console.log.1 (behind its marker) ...
            if rotation > self._rotation + 2:  # ... and those between are gone.
                self._queue.append(SKIPPED_NOTE)
            self._queue.append((rotated_path(self.path), True))
        self._queue.append((self.path, False))
        self._rotation = rotation
        return True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


#: What a follower prints where output rotated away before it could read it.
SKIPPED_NOTE = b"[ironclaw] console output rotated away before it could be followed\n"
