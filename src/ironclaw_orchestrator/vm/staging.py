"""Placing kernel, disks and other files inside the jail, owned by the jail's uid/gid.

Host paths are ``Path``; paths as the jailed VMM sees them are ``PurePosixPath`` (``*_jail_path``).

Link or copy:

* a read-only artifact on the same filesystem as the jail that the jail user can already read
  (world-readable) is hard-linked: instant, and its owner is left alone, since ``chown``
  through a hard link would change the user's own file;
* anything else (writable disks, other filesystems, private files) is copied, trying a
  reflink (``FICLONE``) first, then chowned to the jail uid/gid with owner-only permissions.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import ConfigError, StagingError

_FICLONE = 0x40049409


@dataclass(frozen=True)
class StagedFile:
    """A file placed in the jail."""

    host_path: Path
    jail_path: PurePosixPath
    linked: bool


def check_source(path: Path, what: str) -> None:
    """Refuse a missing, unreadable or non-regular ``path`` before anything is created."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist: check the path") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what} {path} is not a regular file: point it at an image file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{what} {path} is not readable by us: fix its permissions")


def host_path_in(chroot: Path, jail_path: PurePosixPath) -> Path:
    """The host path of ``jail_path`` inside ``chroot``."""
    rel = PurePosixPath(*[p for p in jail_path.parts if p != "/"])
    if ".." in rel.parts:
        raise ConfigError(f"jail path {jail_path} must not contain '..'")
    return chroot / rel


def stage_file(
    src: Path,
    chroot: Path,
    jail_path: PurePosixPath,
    *,
    uid: int,
    gid: int,
    read_only: bool,
) -> StagedFile:
    """Put ``src`` at ``jail_path`` inside ``chroot`` for the VMM running as ``uid:gid``."""
    dest = host_path_in(chroot, jail_path)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists() or dest.is_symlink():
            dest.unlink()
        st = src.stat()
        world_readable = bool(st.st_mode & stat.S_IROTH)
        if read_only and world_readable and _same_fs(src, dest.parent):
            try:
                os.link(src, dest)
                return StagedFile(dest, jail_path, linked=True)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
        _copy(src, dest)
        os.chown(dest, uid, gid)
        os.chmod(dest, 0o400 if read_only else 0o600)
    except OSError as exc:
        raise StagingError(
            f"could not place {src} in the jail at {dest}: {exc.strerror or exc}; check free "
            "space and that the chroot base is on a local, writable filesystem"
        ) from exc
    return StagedFile(dest, jail_path, linked=False)


def make_owned_dir(path: Path, uid: int, gid: int, mode: int = 0o700) -> None:
    """Create ``path`` (and parents) and hand the leaf to ``uid:gid``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, uid, gid)
        os.chmod(path, mode)
    except OSError as exc:
        raise StagingError(f"could not create {path} for uid {uid}: {exc.strerror}") from exc


def _same_fs(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev


def _copy(src: Path, dest: Path) -> None:
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
            return
        except OSError:
            pass  # no reflink support here: fall back to a plain copy
        shutil.copyfileobj(fin, fout, 1 << 20)
