"""A host-wide lock serialising cgroup directory creation and removal across orchestrators.

Without it, one VM's cleanup could ``rmdir`` a shared parent cgroup between another VM
creating that parent and creating its own directory inside it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from ...errors import CgroupError

DEFAULT_LOCK_PATH = Path("/run/ironclaw/cgroup.lock")


class HostLock:
    """``with HostLock(path):`` holds an exclusive ``flock`` on ``path`` (created if missing)."""

    def __init__(self, path: Path = DEFAULT_LOCK_PATH) -> None:
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> HostLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise CgroupError(
                f"cannot open the cgroup lock file {self.path}: {exc.strerror}; make its "
                "directory writable (run as root) or pass another lock_path",
                path=str(self.path),
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None
