"""Placing kernel, disks and other files inside the jail, owned by the jail's uid/gid.

Host paths are ``Path``; paths as the jailed VMM sees them are ``PurePosixPath`` (``*_jail_path``).

Link or copy:

* a read-only artifact on the same filesystem as the jail is hard-linked only if nobody but
  root can change it: owned by root, no group/other write bit (nor an ACL mask granting
  one), no set-id bit, and world-readable so the jail user can read it. A hard link shares
  the inode: a file the jail user (or anyone else) could write would let the jailed VMM
  rewrite the host's file, and ``chown`` through the link would change the user's own file;
* anything else (writable disks, other filesystems, private or user-writable files) is
  copied, trying a reflink (``FICLONE``) first, else only the data extents (a sparse disk
  stays sparse: a clone's 10 GiB root drive with 1 GiB of data copies 1 GiB), then chowned
  to the jail uid/gid with owner-only permissions.

Image directories: with ``image_dirs`` (config) or ``IRONCLAW_IMAGE_DIRS`` (colon-separated)
set, every staged file must resolve, symlinks followed, to a path inside one of them, so a
kernel or rootfs path that is a symlink to, say, ``/etc/shadow`` is refused instead of being
copied into the jail and handed to the jail user. The file is opened once, by its resolved
path with ``O_NOFOLLOW``; it is copied from that descriptor, and a hard link is kept only
if it names the inode that was opened and checked.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import ConfigError, StagingError
from ..names import real_path

_FICLONE = 0x40049409
#: Colon-separated directories staged files must resolve into (when the config sets none).
IMAGE_DIRS_ENV = "IRONCLAW_IMAGE_DIRS"


@dataclass(frozen=True)
class StagedFile:
    """A file placed in the jail."""

    host_path: Path
    jail_path: PurePosixPath
    linked: bool


def image_dirs_from_env() -> tuple[Path, ...] | None:
    """``IRONCLAW_IMAGE_DIRS`` as absolute directories; ``None`` when unset or empty."""
    raw = os.environ.get(IMAGE_DIRS_ENV, "").strip()
    if not raw:
        return None
    dirs = tuple(Path(p) for p in raw.split(":") if p)
    for d in dirs:
        if not d.is_absolute() or any(ord(c) < 0x20 for c in str(d)):
            raise ConfigError(
                f"{IMAGE_DIRS_ENV} entry {str(d)!r} must be an absolute directory "
                "(colon-separated list such as /srv/images:/var/lib/ironclaw/images)"
            )
    return dirs


def effective_image_dirs(configured: Sequence[Path] | None) -> tuple[Path, ...] | None:
    """The configured image directories, else ``IRONCLAW_IMAGE_DIRS``, else ``None``."""
    if configured is not None:
        return tuple(configured)
    return image_dirs_from_env()


def confine(path: Path, what: str, image_dirs: Sequence[Path] | None) -> Path:
    """``path`` with symlinks resolved; ``ConfigError`` if that leaves ``image_dirs``."""
    real = Path(real_path(path))
    dirs = effective_image_dirs(image_dirs)
    if dirs is None:
        return real
    for d in dirs:
        allowed = Path(real_path(d))
        if real == allowed or real.is_relative_to(allowed):
            return real
    shown = ":".join(str(d) for d in dirs)
    raise ConfigError(
        f"{what} {path} resolves to {real}, outside the image directories {shown} "
        f"(image_dirs / {IMAGE_DIRS_ENV}): move the image into one of them, or add its "
        "directory to image_dirs"
    )


def check_source(path: Path, what: str, image_dirs: Sequence[Path] | None = None) -> None:
    """Refuse a missing, unreadable, non-regular or unconfined ``path`` before anything is made."""
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
    confine(path, what, image_dirs)


def host_path_in(chroot: Path, jail_path: PurePosixPath) -> Path:
    """The host path of ``jail_path`` inside ``chroot``."""
    rel = PurePosixPath(*[p for p in jail_path.parts if p != "/"])
    if ".." in rel.parts:
        raise ConfigError(f"jail path {jail_path} must not contain '..'")
    return chroot / rel


def linkable(st: os.stat_result) -> bool:
    """May a file with this status be hard-linked into a jail? Only if only root can change it."""
    mode = st.st_mode
    return (
        stat.S_ISREG(mode)
        and st.st_uid == 0
        and not mode & (stat.S_IWGRP | stat.S_IWOTH | stat.S_ISUID | stat.S_ISGID)
        and bool(mode & stat.S_IROTH)
    )


def stage_file(
    src: Path,
    chroot: Path,
    jail_path: PurePosixPath,
    *,
    uid: int,
    gid: int,
    read_only: bool,
    image_dirs: Sequence[Path] | None = None,
) -> StagedFile:
    """Put ``src`` at ``jail_path`` inside ``chroot`` for the VMM running as ``uid:gid``."""
    dest = host_path_in(chroot, jail_path)
    real = confine(src, f"file for {jail_path}", image_dirs)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise StagingError(
            f"could not open {src} ({real}) to place it in the jail: {exc.strerror or exc}"
        ) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StagingError(f"{src} ({real}) is not a regular file: point it at an image file")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists() or dest.is_symlink():
            dest.unlink()
        if read_only and linkable(st) and st.st_dev == dest.parent.stat().st_dev:
            try:
                os.link(real, dest, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOENT):
                    raise
            else:
                # Keep the link only if it is the inode we opened and checked (the path
                # may have been swapped since); otherwise copy from the open file.
                linked = os.lstat(dest)
                if (linked.st_dev, linked.st_ino) == (st.st_dev, st.st_ino):
                    return StagedFile(dest, jail_path, linked=True)
                dest.unlink()
        _copy(fd, dest)
        os.chown(dest, uid, gid)
        os.chmod(dest, 0o400 if read_only else 0o600)
    except OSError as exc:
        raise StagingError(
            f"could not place {src} in the jail at {dest}: {exc.strerror or exc}; check free "
            "space and that the chroot base is on a local, writable filesystem"
        ) from exc
    finally:
        os.close(fd)
    return StagedFile(dest, jail_path, linked=False)


def make_owned_dir(path: Path, uid: int, gid: int, mode: int = 0o700) -> None:
    """Create ``path`` (and parents) and hand the leaf to ``uid:gid``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, uid, gid)
        os.chmod(path, mode)
    except OSError as exc:
        raise StagingError(f"could not create {path} for uid {uid}: {exc.strerror}") from exc


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each data extent of the open file ``fd`` (holes skipped; a
    filesystem without ``SEEK_DATA`` reports the whole file as data)."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos, size
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end


def copy_extents(
    fd_in: int, fd_out: int, size: int, progress: Callable[[int], None] | None = None
) -> None:
    """Copy the data extents of ``fd_in`` to the same offsets of ``fd_out`` (in the kernel,
    ``copy_file_range``) and give ``fd_out`` the size ``size``: holes stay holes."""
    for start, end in data_extents(fd_in, size):
        pos = start
        while pos < end:
            n = os.copy_file_range(fd_in, fd_out, end - pos, pos, pos)
            if n == 0:
                raise OSError(errno.EIO, f"short copy at offset {pos} (file shrank?)")
            pos += n
            if progress is not None:
                progress(pos)
    os.ftruncate(fd_out, size)


def _copy(src_fd: int, dest: Path) -> None:
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(out, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), _FICLONE, src_fd)
            return
        except OSError:
            pass  # no reflink support here: copy the data, leave holes as holes
        try:
            copy_extents(src_fd, fout.fileno(), os.fstat(src_fd).st_size)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            # copy_file_range refused (old kernel, special filesystem): a plain copy.
            os.ftruncate(fout.fileno(), 0)
            os.lseek(src_fd, 0, os.SEEK_SET)
            with os.fdopen(os.dup(src_fd), "rb") as fin:
                shutil.copyfileobj(fin, fout, 1 << 20)
