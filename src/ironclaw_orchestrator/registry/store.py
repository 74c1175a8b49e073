"""The registry's files: the trusted state directory, its lock, and crash-safe record writes.

Costs per VM matter here (issue: per-VM CPU, and /run may be ext4, where creating and
unlinking a file with data costs kernel time), so:

- The lock file is opened once per process and state directory and kept open
  (:class:`LockFile`); each operation only ``flock``\\ s it. A lock file that was removed or
  replaced meanwhile is noticed (its inode no longer matches the path) and reopened, so
  every process still locks the one file; a forked child never uses its parent's open file
  (an ``flock`` belongs to the open file, which a fork shares).
- A record file is created once, at its claim, padded to one page, and later updates
  overwrite it in place with one ``pwrite`` of at most one page (:func:`overwrite`): no new
  file, rename or unlink per update. Crash safety: the kernel copies a one-page write into
  the page cache whole before a killed process dies (a fatal signal is only acted on between
  pages), so a crash leaves the old record or the new one. Readers hold the lock shared,
  writers exclusive, so no reader sees a write half-copied. A record larger than a page,
  and every write of a ``durable`` registry (whose records must also survive power loss),
  goes to a new file swapped in atomically instead (:func:`~..safefs.replace_file`).
- The lock file's first 8 bytes count the changes of records' uids/gids (the registry's
  *generation*, :meth:`LockFile.generation`), so that an allocation reads no record unless
  another process changed ids since (:class:`~.ids.UsedIds`). Not fsynced: after a reboot
  no process has a copy to compare it with.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from ..errors import RegistryError
from ..safefs import rename_noreplace, replace_file
from .ids import UsedIds
from .record import RECORD_SIZE, RECORD_SUFFIX, VmRecord, decode_record

__all__ = [
    "LOCK_NAME",
    "STATE_DIR_ENV",
    "LockFile",
    "check_state_dir",
    "ensure_state_dir",
    "fsync_dir",
    "lock_file",
    "overwrite",
    "publish_new",
    "read_all",
    "read_record",
    "replace",
    "write_tmp",
]

STATE_DIR_ENV = "IRONCLAW_STATE_DIR"
LOCK_NAME = ".lock"
#: Lock files kept open per process (one per state directory; tests use many directories).
MAX_OPEN_LOCKS = 8
#: Records whose last write a :class:`LockFile` remembers (VMs of this process, usually).
MAX_REMEMBERED = 1024

_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


# --------------------------------------------------------------------------- state directory


def ensure_state_dir(path: Path) -> None:
    """Create ``path`` 0700 if missing; refuse it unless it is a private directory of ours."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        try:
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            os.mkdir(path, 0o700)
            os.chmod(path, 0o700)  # umask may have removed bits we want; be exact
        except FileExistsError:
            pass  # made concurrently; checked below
        except OSError as exc:
            raise RegistryError(
                f"cannot create the state directory {path}: {exc.strerror}; run as root or "
                f"set {STATE_DIR_ENV} to a directory you own"
            ) from exc
        st = os.lstat(path)
    except OSError as exc:
        raise RegistryError(
            f"cannot inspect the state directory {path}: {exc.strerror}; set "
            f"{STATE_DIR_ENV} to a directory you own"
        ) from exc
    check_state_dir(path, st)


def check_state_dir(path: Path, st: os.stat_result) -> None:
    """Refuse a state directory anyone but us could write records into."""
    if stat.S_ISLNK(st.st_mode):
        raise RegistryError(
            f"refusing the state directory {path}: it is a symlink (to "
            f"{os.readlink(path)!r}); remove the link and let ironclaw create the directory, "
            f"or set {STATE_DIR_ENV} to a real directory"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise RegistryError(
            f"refusing the state directory {path}: it is not a directory; remove it or set "
            f"{STATE_DIR_ENV} elsewhere"
        )
    if st.st_uid != os.geteuid():
        raise RegistryError(
            f"refusing the state directory {path}: it is owned by uid {st.st_uid}, not by us "
            f"(uid {os.geteuid()}), so its records cannot be trusted; fix with "
            f"`chown {os.geteuid()} {path}` if it is yours, or set {STATE_DIR_ENV} elsewhere"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise RegistryError(
            f"refusing the state directory {path}: it is writable by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}), so anyone could forge records; fix with "
            f"`chmod 700 {path}`"
        )


# --------------------------------------------------------------------------- the lock


class LockFile:
    """``<state_dir>/.lock``, opened once and ``flock``\\ ed per operation.

    A thread lock orders this process's threads (they share the one open file, so ``flock``
    alone would not); ``flock`` orders processes. Nested use by one thread is allowed and
    locks once; a shared hold cannot be upgraded.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self._mutex = threading.RLock()
        self._depth = 0
        self._mode = 0
        #: Per record (by VM id): the bytes this process last wrote and the record they
        #: encode. An update whose file still holds those bytes skips parsing it; any other
        #: writer's change shows as different bytes. Used with the lock held.
        self.written: OrderedDict[str, tuple[bytes, VmRecord]] = OrderedDict()
        #: The records' uids/gids as of a generation of this open file (dropped with it).
        self.used = UsedIds()

    def remember(self, vm_id: str, data: bytes, record: VmRecord) -> None:
        self.written[vm_id] = (data, record)
        self.written.move_to_end(vm_id)
        if len(self.written) > MAX_REMEMBERED:
            self.written.popitem(last=False)

    def forget(self, vm_id: str) -> None:
        self.written.pop(vm_id, None)

    def generation(self) -> int:
        """The registry's generation (lock held): the lock file's first 8 bytes, 0 if it
        has fewer (an older release leaves the file empty, and never writes to it)."""
        return int.from_bytes(os.pread(self._fd, 8, 0).ljust(8, b"\0"), "little")

    def set_generation(self, generation: int) -> None:
        """Store ``generation`` (lock held exclusively): one 8-byte write into one page,
        which the kernel copies whole, as it does a record (see the module docstring)."""
        data = (generation % 2**64).to_bytes(8, "little")
        if os.pwrite(self._fd, data, 0) != len(data):
            raise OSError(errno.EIO, f"{self.path}: short write of the registry generation")

    @contextlib.contextmanager
    def hold(self, *, exclusive: bool = True) -> Iterator[bool]:
        """Lock for this block; yields whether the lock is held.

        A shared hold (a reader) does not create the lock file: where there is none, no
        record was written since it was made or removed, and the reader goes unlocked
        (yielding ``False``; see ``Registry._read_locked``). Reads leave the directory as
        they found it.
        """
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        with self._mutex:
            if self._depth:
                if mode == fcntl.LOCK_EX and self._mode != fcntl.LOCK_EX:
                    raise RuntimeError(f"{self.path}: cannot upgrade a shared registry lock")
            else:
                self._mode = self._acquire(mode)
            self._depth += 1
            pid = os.getpid()
            try:
                yield bool(self._mode)
            finally:
                # A child forked inside the hold starts afresh (forget_after_fork): its
                # depth is 0 and the descriptor was the parent's.
                if os.getpid() == pid:
                    self._depth -= 1
                    if not self._depth and self._mode:
                        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _acquire(self, mode: int) -> int:
        """``flock`` the file in ``mode``; the mode held, 0 if a reader found no file."""
        while True:
            if self._fd < 0 and not self._open(create=mode == fcntl.LOCK_EX):
                return 0
            fcntl.flock(self._fd, mode)
            if self._is_current():
                return mode
            # Removed or replaced while we held it open: others lock the new file.
            self.close()

    def _open(self, *, create: bool) -> bool:
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            self._fd = os.open(self.path, flags, 0o600)
        except FileNotFoundError:
            if create:
                raise RegistryError(
                    f"cannot open the registry lock {self.path}: its state directory is gone"
                ) from None
            return False
        except OSError as exc:
            raise RegistryError(
                f"cannot open the registry lock {self.path}: {exc.strerror}; check the "
                "state directory (it must be ours, mode 0700, and the lock not a symlink)"
            ) from exc
        return True

    def _is_current(self) -> bool:
        held = os.fstat(self._fd)
        try:
            named = os.lstat(self.path)
        except FileNotFoundError:
            return False
        return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)

    def close(self) -> None:
        """Close the file (releasing an ``flock`` this process holds through it)."""
        self.used.drop()  # valid for this open file only
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def idle(self) -> bool:
        return not self._depth

    def close_if_idle(self) -> bool:
        """Close the file unless a thread is using it (or about to: holds the mutex)."""
        if not self._mutex.acquire(blocking=False):
            return False
        try:
            if self._depth:
                return False
            self.close()
            return True
        finally:
            self._mutex.release()

    def __del__(self) -> None:
        # One evicted by lock_file() while a thread was about to use it is reopened by that
        # thread; closed here once nobody refers to it. At interpreter exit the modules
        # close() uses may be gone already: nothing to report then.
        try:  # noqa: SIM105 (contextlib itself may be gone)
            self.close()
        except Exception:
            pass

    def forget_after_fork(self) -> None:
        """In a forked child: drop the parent's open file without unlocking it (an
        ``flock`` is released only when every descriptor of the open file is closed)."""
        self._mutex = threading.RLock()
        self._depth = 0
        self.close()


_locks: OrderedDict[str, LockFile] = OrderedDict()
_locks_guard = threading.Lock()


def lock_file(state_dir: str) -> LockFile:
    """The process's :class:`LockFile` of ``state_dir`` (at most :data:`MAX_OPEN_LOCKS`
    are kept open; the least recently used idle one is closed beyond that)."""
    key = state_dir
    with _locks_guard:
        lock = _locks.get(key)
        if lock is None:
            lock = _locks[key] = LockFile(f"{state_dir}/{LOCK_NAME}")
            for old_key, old in list(_locks.items()):
                if len(_locks) <= MAX_OPEN_LOCKS:
                    break
                if old is not lock and old.close_if_idle():
                    del _locks[old_key]
        else:
            _locks.move_to_end(key)
        return lock


def _after_fork_in_child() -> None:
    for lock in _locks.values():
        lock.forget_after_fork()
    global _locks_guard
    _locks_guard = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


# --------------------------------------------------------------------------- record files


def read_all(fd: int) -> bytes:
    """The whole regular file open at ``fd`` (a record of a page: one read)."""
    want = RECORD_SIZE + 1
    chunk = os.read(fd, want)
    if len(chunk) < want:  # a short read of a regular file is its end
        return chunk
    chunks = [chunk]
    while chunk := os.read(fd, want):
        chunks.append(chunk)
    return b"".join(chunks)


def read_record(path: Path | str) -> VmRecord:
    """Parse one record file; ``RegistryError`` if unreadable or invalid."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            raw = read_all(fd)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise RegistryError(f"cannot read VM record {path}: {exc.strerror}") from exc
    return decode_record(raw, path)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tmp(state_dir: str, vm_id: str, data: bytes, *, durable: bool) -> str:
    """Write ``data`` to a new temporary file next to the record (fsynced if ``durable``)."""
    tmp = f"{state_dir}/.{vm_id}{RECORD_SUFFIX}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, _NEW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def publish_new(tmp: str, path: str) -> None:
    """Give the written ``tmp`` the name ``path`` unless that exists (``FileExistsError``):
    an atomic create-with-content. ``tmp`` is gone afterwards, whatever happened."""
    try:
        rename_noreplace(tmp, path)
        return
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    try:  # a file system without RENAME_NOREPLACE: link() fails alike if the name exists
        os.link(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def replace(tmp: str, path: str) -> None:
    """Put the written ``tmp`` in place of the record ``path`` atomically (removing ``tmp``
    if that fails)."""
    try:
        replace_file(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def overwrite(fd: int, data: bytes) -> None:
    """Overwrite the record open at ``fd`` in place with ``data`` (at most one page, and no
    shorter than the file: see the module docstring for why this is crash-safe)."""
    if len(data) > RECORD_SIZE:
        raise ValueError(f"{len(data)} bytes are more than one page")
    written = os.pwrite(fd, data, 0)
    if written != len(data):  # cannot happen for an overwrite of one allocated page
        raise OSError(errno.EIO, f"short write of a record ({written} of {len(data)} bytes)")
