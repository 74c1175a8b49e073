"""The few file-system operations cgroup code performs, behind one injectable object.

Real cgroup files are kernel pseudo-files: a value must go in with one ``write(2)`` on a file
that already exists (never ``O_CREAT``), and ``rmdir`` removes a cgroup together with its
pseudo-files. Unit tests replace :class:`CgroupFs` with a fake "kernel" working on a plain
directory tree, so every call that touches the host goes through here.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


class CgroupFs:
    """Real host operations. Subclass to simulate the kernel in tests."""

    def read(self, path: Path) -> str:
        # os.read, not open(): no buffered text object for a file of a few bytes.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = [os.read(fd, 65536)]
            while chunks[-1]:
                chunks.append(os.read(fd, 65536))
        finally:
            os.close(fd)
        return b"".join(chunks).decode("utf-8")

    def write(self, path: Path, value: str) -> None:
        data = value.encode()
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            written = os.write(fd, data)
        finally:
            os.close(fd)
        if written != len(data):
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")

    def exists(self, path: Path) -> bool:
        return path.exists()

    def is_dir(self, path: Path) -> bool:
        return path.is_dir()

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def subdirs(self, path: Path) -> list[Path]:
        """Child cgroups of ``path`` (directories only)."""
        # scandir's d_type, not a stat per entry: a v1 cgroup holds dozens of pseudo-files.
        try:
            with os.scandir(path) as entries:
                return sorted(path / e.name for e in entries if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []

    def has_child_cgroups(self, path: Path) -> bool:
        """Whether ``path`` has a child cgroup now (``False`` when it does not exist).

        One ``stat``: cgroupfs (kernfs) keeps a directory's link count at 2 + its
        subdirectories. A file system that does not (link count 1) only ever answers
        ``False``, which sends callers down their careful path.
        """
        try:
            return os.stat(path).st_nlink > 2
        except FileNotFoundError:
            return False

    def is_cgroup(self, path: Path) -> bool:
        """True if ``path`` is a cgroup (the kernel gives every cgroup a ``cgroup.procs``)."""
        return self.exists(path / "cgroup.procs")

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> None:
        """Signal ``pid`` through a pidfd; ``ProcessLookupError`` if it is gone."""
        from ...pidfd import opened, send_signal

        with opened(pid) as fd:
            if fd is None or not send_signal(fd, sig):
                raise ProcessLookupError(pid)


def read_pids(fs: CgroupFs, path: Path) -> list[int]:
    """Pids listed in a ``cgroup.procs``/``tasks`` file; ``[]`` when it does not exist."""
    try:
        text = fs.read(path)
    except FileNotFoundError:
        return []
    return [int(tok) for tok in text.split() if tok.isdigit()]


def read_optional(fs: CgroupFs, path: Path) -> str | None:
    """The stripped content of ``path``, or ``None`` when it is absent or unreadable."""
    try:
        return fs.read(path).strip()
    except OSError:
        return None
