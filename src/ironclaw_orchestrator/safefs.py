"""Creating and removing directories as root without following anyone's symlinks.

We run as root and remove whole trees (jail directories, run directories). If any component
of such a path could be swapped by another user for a symlink, ``rmtree`` would delete the
link's target. So every component is opened with ``O_NOFOLLOW`` relative to its parent's
fd, the tree is removed relative to the last fd (``shutil.rmtree(dir_fd=...)``, itself
fd-based), and directories are created under a temporary name, then renamed into place with
``RENAME_NOREPLACE`` so they appear complete (with their marker) or not at all.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["open_dir_nofollow", "rename_noreplace", "rmtree_nofollow"]

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


@contextmanager
def open_dir_nofollow(path: Path) -> Iterator[int]:
    """An fd for the absolute directory ``path``, reached without following any symlink.

    Raises ``OSError`` (ELOOP / ENOTDIR) if any component is a symlink or not a directory.
    """
    if not path.is_absolute():
        raise ValueError(f"{path} is not absolute")
    fd = os.open("/", _O_DIR)
    try:
        for part in path.parts[1:]:
            if part in (".", ".."):
                raise OSError(errno.EINVAL, f"refusing '{part}' in {path}")
            try:
                nxt = os.open(part, _O_DIR, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise OSError(
                        exc.errno,
                        f"a component ({part!r}) is a symlink or not a directory",
                        str(path),
                    ) from None
                raise
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


def rmtree_nofollow(path: Path) -> bool:
    """Remove the directory tree ``path``; ``False`` if it did not exist.

    No component of ``path`` (nor anything inside) is followed if it is a symlink: a path
    whose parent was swapped for a symlink raises ``OSError`` instead of deleting elsewhere.
    """
    try:
        parent_cm = open_dir_nofollow(path.parent)
        parent = parent_cm.__enter__()
    except FileNotFoundError:
        return False
    try:
        try:
            st = os.stat(path.name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            raise OSError(errno.ENOTDIR, "not a directory (a symlink?), not removed", str(path))
        shutil.rmtree(path.name, dir_fd=parent)
    finally:
        parent_cm.__exit__(None, None, None)
    return True


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing with ``FileExistsError`` if ``dst`` exists.

    Plain ``rename`` would silently replace an empty directory at ``dst``.
    """
    res = _libc().renameat2(
        _AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE
    )
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(src), None, str(dst))
