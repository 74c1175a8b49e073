"""A crash-safe registry of the VMs on this host: one JSON record per VM in a state directory.

Why it exists: a VM owns host resources (a jail directory, cgroups, a network namespace, a
run directory, a unique uid/gid) that outlive the process that made them if it crashes. The
registry records *who* owns each VM (pid plus process start time, so a recycled pid is never
mistaken for the owner) and *what* was made for it, so that ``ironclaw gc`` can tell a live
VM from a leftover and remove exactly what we created, nothing else.

Layout of the state directory (default ``/run/ironclaw/registry``, or
``$IRONCLAW_STATE_DIR``; it lives in ``/run`` so records vanish with the resources a reboot
clears)::

    .lock                       fcntl lock: exclusive for claim/update/release/uid
                                allocation, shared for reading records; holds the
                                generation of the records' uids/gids (see .ids)
    <vm_id>.json                the record of one VM (VmRecord), padded to one page
    <vm_id>.log                 output of a detached VM's supervisor (removed with the record)
    .<vm_id>.json.<hex>.tmp     a write in progress; a crash may leave one behind (gc removes it)
    .config-<hex>.json          a detached VM's config, handed to its supervisor (0600)
    <vm_id>.json.corrupt-<ts>   a record gc could not parse, moved aside for inspection

Crash safety: a claim writes a temporary file in the same directory and renames it to the
record only if that name is free (atomic create-with-content); updates overwrite the record
in place with one single-page write (see :mod:`.store` for why a crash then leaves the old
record or the new one, never a torn file). Writes are not fsynced unless ``durable=True``
(which also writes each update to a new file swapped in atomically): the page cache survives
a process crash, and a kernel crash or power loss also ends every VM, netns and cgroup a
record could name (what outlives a reboot, the jail directories, carries our marker and is
found by ``gc`` without a record).

Trust: the directory must be a real directory (not a symlink), owned by us and not writable
by group or others; otherwise every operation is refused, because anyone who can write a
record could make ``gc`` kill a process or delete a directory of their choosing.

The pieces: :mod:`.record` (the model and its encoding), :mod:`.store` (the directory, its
lock, the writes), :mod:`.ids` (uid/gid allocation). This package imports nothing from
:mod:`ironclaw_orchestrator.vm`, so the VM code can depend on it without an import cycle.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ConfigError, RegistryError
from ..procfs import describe_process, is_alive, read_start_time
from . import ids, store
from .record import (
    LOG_SUFFIX,
    RECORD_FORMAT,
    RECORD_SIZE,
    RECORD_SUFFIX,
    CorruptRecord,
    RegistryScan,
    VmRecord,
    VmState,
    check_vm_id,
    decode_record,
    encode_record,
    log_name,
    make_record,
    pad_record,
    record_name,
)
from .store import LOCK_NAME, STATE_DIR_ENV, LockFile

__all__ = [
    "DEFAULT_STATE_DIR",
    "LOCK_NAME",
    "LOG_SUFFIX",
    "RECORD_FORMAT",
    "RECORD_SIZE",
    "RECORD_SUFFIX",
    "STATE_DIR_ENV",
    "CorruptRecord",
    "Registry",
    "RegistryScan",
    "VmRecord",
    "VmState",
    "check_vm_id",
    "default_state_dir",
    "describe_process",
    "is_alive",
    "read_process_start",
]

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/run/ironclaw/registry")

#: Kept under their old names: process identity lives in :mod:`..procfs`.
read_process_start = read_start_time

_RDWR = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC


_own_start: tuple[int, int] | None = None


def _start_time(pid: int) -> int | None:
    """Start time of ``pid``; this process's own is read once (it cannot change; a forked
    child has another pid)."""
    global _own_start
    if _own_start is not None and _own_start[0] == pid:
        return _own_start[1]
    start = read_process_start(pid)
    if start is not None and pid == os.getpid():
        _own_start = (pid, start)
    return start


def default_state_dir() -> Path:
    """``$IRONCLAW_STATE_DIR`` if set, else ``/run/ironclaw/registry`` for root, else a
    per-user directory (see :mod:`ironclaw_orchestrator.paths`)."""
    from ..paths import default_state_dir as _default

    return _default()


class Registry:
    """The VM registry in ``state_dir`` (created 0700 if missing; see the module docstring)."""

    def __init__(self, state_dir: Path | str | None = None, *, durable: bool = False) -> None:
        path = Path(state_dir) if state_dir is not None else default_state_dir()
        self.state_dir = path if path.is_absolute() else Path.cwd() / path
        #: fsync every write (see the module docstring for why it is off by default).
        self.durable = durable
        store.ensure_state_dir(self.state_dir)
        # Plain strings on the per-VM path: pathlib's joins cost more than the I/O here.
        self._dir = str(self.state_dir)

    # ------------------------------------------------------------------ paths

    def record_path(self, vm_id: str) -> Path:
        return self.state_dir / record_name(vm_id)

    def log_path(self, vm_id: str) -> Path:
        return self.state_dir / log_name(vm_id)

    @property
    def lock_path(self) -> Path:
        return self.state_dir / LOCK_NAME

    def _path(self, vm_id: str) -> str:
        return f"{self._dir}/{record_name(vm_id)}"

    # ------------------------------------------------------------------ locking and I/O

    def _lock(self) -> LockFile:
        return store.lock_file(self._dir)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the registry's exclusive lock (``<state_dir>/.lock``, an ``flock``)."""
        with self._lock().hold():
            yield

    def _fsync_dir(self) -> None:
        if self.durable:
            store.fsync_dir(self._dir)

    def _write_tmp(self, vm_id: str, data: bytes) -> str:
        """Write ``data`` to a new temporary file next to the record (the only way a record
        file is created; work-count tests count the calls)."""
        return store.write_tmp(self._dir, vm_id, data, durable=self.durable)

    def _write_record(self, vm_id: str, data: bytes, *, fd: int = -1, size: int = 0) -> bytes:
        """Write the encoded record: a new record file if ``fd`` is -1, else over the one
        open at ``fd`` (``size`` bytes long). Returns the bytes the file now holds. Every
        record write goes through here (work-count tests count the calls)."""
        path = self._path(vm_id)
        if fd >= 0 and not self.durable and len(data) <= size <= RECORD_SIZE:
            padded = pad_record(data, size)
            try:
                store.overwrite(fd, padded)
                return padded
            except OSError as exc:  # whatever it left, a whole new file replaces it
                log.warning("VM %s: writing its record %s in place failed: %s", vm_id, path, exc)
        data = pad_record(data)  # room for updates in place
        tmp = self._write_tmp(vm_id, data)
        try:
            if fd < 0:
                store.publish_new(tmp, path)
            else:
                store.replace(tmp, path)
        except FileExistsError:
            raise self._in_use_error(vm_id) from None
        except OSError as exc:
            raise RegistryError(
                f"VM {vm_id}: cannot write its record {path}: {exc.strerror}"
            ) from exc
        self._fsync_dir()
        return data

    def _read(self, path: Path | str) -> VmRecord:
        """Parse one record file; ``RegistryError`` if unreadable or invalid."""
        return store.read_record(path)

    def _open_for_update(
        self, lock: LockFile, vm_id: str, missing: str
    ) -> tuple[int, bytes, VmRecord]:
        """Open the record of ``vm_id`` to change it (lock held): ``(fd, contents, record)``.

        The record is parsed only if the file does not hold what this process last wrote.
        """
        path = self._path(vm_id)
        try:
            fd = os.open(path, _RDWR)
        except FileNotFoundError:
            raise RegistryError(missing) from None
        except OSError as exc:
            raise RegistryError(f"cannot read VM record {path}: {exc.strerror}") from exc
        try:
            raw = store.read_all(fd)
            known = lock.written.get(vm_id)
            current = (
                known[1] if known is not None and known[0] == raw else decode_record(raw, path)
            )
        except BaseException:
            os.close(fd)
            raise
        return fd, raw, current

    def _save(
        self,
        lock: LockFile,
        record: VmRecord,
        fd: int = -1,
        size: int = 0,
        current: VmRecord | None = None,
        encoded: bytes | None = None,
    ) -> None:
        """Write ``record`` (``encoded`` already, or not): a new file, or over ``current``
        (open at ``fd``)."""
        before = () if current is None else ids.ids_tuple(current.uid, current.gid)
        after = ids.ids_tuple(record.uid, record.gid)
        if encoded is None:
            encoded = encode_record(record)
        with ids.changing(lock, self._dir, f"{record.vm_id}{RECORD_SUFFIX}", after, before):
            data = self._write_record(record.vm_id, encoded, fd=fd, size=size)
        lock.remember(record.vm_id, data, record)

    # ------------------------------------------------------------------ API

    def claim(self, vm_id: str, *, allocate_ids: bool = False, **fields: Any) -> VmRecord:
        """Reserve ``vm_id`` for the calling process before any host resource exists.

        ``owner_pid``/``owner_start_time`` default to this process. ``allocate_ids=True``
        also gives the VM a uid/gid of its own (as :meth:`allocate_ids` does) in the same
        locked write, so a start costs one registry write, not two. Raises
        :class:`RegistryError` if the id is held by a live owner, or left behind by a dead
        one (which ``ironclaw gc`` cleans up: a leftover is never silently taken over, since
        its VMM, jail or cgroups may still exist).
        """
        check_vm_id(vm_id)
        fields.setdefault("owner_pid", os.getpid())
        if "owner_start_time" not in fields:
            start = _start_time(int(fields["owner_pid"]))
            if start is None:
                raise RegistryError(
                    f"VM {vm_id}: cannot read the start time of owner pid {fields['owner_pid']} "
                    "(is /proc mounted, and the process alive?)"
                )
            fields["owner_start_time"] = start
        record = make_record(vm_id, fields, None)
        lock = self._lock()
        vetted = ids.vet_candidate(lock) if allocate_ids else None  # NSS, not under the lock
        with lock.hold():
            if allocate_ids:
                if os.path.lexists(self._path(vm_id)):
                    raise self._in_use_error(vm_id)  # before scanning for free ids
                n = ids.free_id(self._dir, vm_id, lock=lock, vetted=vetted)
                record = record.model_copy(update={"uid": n, "gid": n})
            self._save(lock, record)
        return record

    def _in_use_error(self, vm_id: str) -> RegistryError:
        path = self._path(vm_id)
        try:
            other = self._read(path)
        except FileNotFoundError:
            return RegistryError(f"VM id {vm_id} was just taken and released again; retry")
        except RegistryError as exc:
            return RegistryError(
                f"VM id {vm_id} is in use: its record is unreadable ({exc}); run `ironclaw gc`"
            )
        who = describe_process(other.owner_pid, other.owner_start_time)
        if other.owner_alive():
            return RegistryError(
                f"VM id {vm_id} is in use ({who}); pick another id or `ironclaw vm stop {vm_id}`"
            )
        return RegistryError(
            f"VM id {vm_id} was left behind by its owner ({who}), which is gone; its VM or "
            f"resources may still exist: run `ironclaw gc` to clean it up, then retry"
        )

    def get(self, vm_id: str) -> VmRecord | None:
        """The record of ``vm_id``, or ``None`` if there is none."""
        path = self._path(vm_id)
        with self._lock().hold(exclusive=False) as locked:
            try:
                return self._read(path)
            except FileNotFoundError:
                return None
            except RegistryError:
                if locked:
                    raise
        return self._read_locked(path)

    def _read_locked(self, path: str) -> VmRecord | None:
        """Read again under the lock what an unlocked reader found unreadable: a write in
        place may have been under way (a writer who made the lock file meanwhile)."""
        with self._lock().hold():
            try:
                return self._read(path)
            except FileNotFoundError:
                return None

    def update(self, vm_id: str, **fields: Any) -> VmRecord:
        """Change fields of an existing record atomically; ``RegistryError`` if it is gone.

        The new record is made and encoded before the lock is taken, from what this process
        last wrote (the usual case: our own VM); under the lock it is written only if the
        file still holds exactly that, else it is made again from the file. So the lock is
        held for the read and the write alone, not for the validation and encoding.
        """
        lock = self._lock()
        known = lock.written.get(vm_id)  # without the lock: checked against the file below
        ready = None
        if known is not None:
            record = make_record(vm_id, fields, known[1])
            ready = (known[0], record, encode_record(record))
        with lock.hold():
            fd, raw, current = self._open_for_update(
                lock,
                vm_id,
                f"VM {vm_id} has no record in {self.state_dir} (released, or removed by "
                "`ironclaw gc`); cannot update it",
            )
            try:
                if ready is not None and ready[0] == raw:
                    record = ready[1]
                    self._save(lock, record, fd, len(raw), current, ready[2])
                else:
                    record = make_record(vm_id, fields, current)
                    self._save(lock, record, fd, len(raw), current)
            finally:
                os.close(fd)
        return record

    def release(self, vm_id: str) -> None:
        """Delete the record (and the supervisor log) of ``vm_id``; idempotent.

        This also frees its uid/gid. Call it only once everything the record names is gone.
        """
        paths = (self._path(vm_id), f"{self._dir}/{log_name(vm_id)}")
        lock = self._lock()
        with lock.hold(), ids.changing(lock, self._dir, record_name(vm_id), ()):
            lock.forget(vm_id)
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            self._fsync_dir()

    def scan(self) -> RegistryScan:
        """Every record, plus the files that could not be parsed (never raises for those)."""
        result = RegistryScan()
        with self._lock().hold(exclusive=False) as locked:
            try:
                names = sorted(os.listdir(self.state_dir))
            except OSError as exc:
                raise RegistryError(
                    f"cannot list the state directory {self.state_dir}: {exc}"
                ) from exc
            for name in names:
                if name.startswith(".") or not name.endswith(RECORD_SUFFIX):
                    continue
                path = self.state_dir / name
                try:
                    result.records.append(self._read(path))
                except FileNotFoundError:
                    continue  # released meanwhile
                except RegistryError as exc:
                    result.problems.append(CorruptRecord(path, str(exc)))
        if not locked and result.problems:
            problems, result.problems = result.problems, []
            for problem in problems:
                try:
                    record = self._read_locked(str(problem.path))
                except RegistryError as exc:
                    result.problems.append(CorruptRecord(problem.path, str(exc)))
                    continue
                if record is not None:
                    result.records.append(record)
            result.records.sort(key=lambda r: r.vm_id)
        return result

    def list(self) -> list[VmRecord]:
        """Every readable record, sorted by id; unreadable files are logged and skipped."""
        found = self.scan()
        for problem in found.problems:
            log.warning("skipping %s: %s", problem.path, problem.error)
        return found.records

    def quarantine(self, path: Path) -> Path:
        """Move a corrupt record aside (``<name>.corrupt-<time>``) so its id can be reused."""
        if path.parent != self.state_dir or not path.name.endswith(RECORD_SUFFIX):
            raise RegistryError(f"{path} is not a record file of {self.state_dir}")
        target = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        lock = self._lock()
        with lock.hold(), ids.changing(lock, self._dir, path.name, ()):
            lock.forget(path.name.removesuffix(RECORD_SUFFIX))
            os.replace(path, target)
            self._fsync_dir()
        return target

    def allocate_ids(
        self, vm_id: str, first: int = ids.DEFAULT_FIRST, count: int = ids.DEFAULT_COUNT
    ) -> tuple[int, int]:
        """Give the claimed ``vm_id`` a uid and gid no other record uses; return ``(uid, gid)``.

        Picks the lowest ``n`` in ``[first, first + count)`` used by no record (as uid or gid)
        and by no account or group of this host, stores ``uid = gid = n`` in the record, all
        under the registry lock, so concurrent orchestrators never pick the same ids. Ids are
        freed with the record. Idempotent: a record that already has ids keeps them.
        """
        if first < 1 or count < 1 or first + count > 2**32 - 1:
            raise ConfigError(f"uid range {first}..{first + count - 1} is invalid")
        lock = self._lock()
        vetted = ids.vet_candidate(lock, first, count)  # NSS, not under the lock
        with lock.hold():
            fd, raw, current = self._open_for_update(
                lock,
                vm_id,
                f"VM {vm_id} has no record: claim the id before allocating its uid/gid",
            )
            try:
                if current.uid is not None and current.gid is not None:
                    return current.uid, current.gid
                n = ids.free_id(self._dir, vm_id, first, count, lock=lock, vetted=vetted)
                record = make_record(vm_id, {"uid": n, "gid": n}, current)
                self._save(lock, record, fd, len(raw), current)
            finally:
                os.close(fd)
            return n, n
