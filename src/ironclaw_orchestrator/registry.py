"""A crash-safe registry of the VMs on this host: one JSON record per VM in a state directory.

Why it exists: a VM owns host resources (a jail directory, cgroups, a network namespace, a
run directory, a unique uid/gid) that outlive the process that made them if it crashes. The
registry records *who* owns each VM (pid plus process start time, so a recycled pid is never
mistaken for the owner) and *what* was made for it, so that ``ironclaw gc`` can tell a live
VM from a leftover and remove exactly what we created, nothing else.

Layout of the state directory (default ``/run/ironclaw/registry``, or
``$IRONCLAW_STATE_DIR``; it lives in ``/run`` so records vanish with the resources a reboot
clears)::

    .lock                       fcntl lock serialising claim/update/release/uid allocation
    <vm_id>.json                the record of one VM (VmRecord)
    <vm_id>.log                 output of a detached VM's supervisor (removed with the record)
    .<vm_id>.json.<hex>.tmp     a write in progress; a crash may leave one behind (gc removes it)
    .config-<hex>.json          a detached VM's config, handed to its supervisor (0600)
    <vm_id>.json.corrupt-<ts>   a record gc could not parse, moved aside for inspection

Crash safety: every write goes to a temporary file in the same directory, then is renamed
over the record (or, for a claim, hard-linked to it, which fails atomically if the id is
taken). An orchestrator killed at any point leaves either the old record or the new one, never
a torn file; leftover temporary files are ignored by readers. Writes are not fsynced unless
``durable=True``: the page cache survives a process crash, and a kernel crash or power loss
also ends every VM, netns and cgroup a record could name (what outlives a reboot, the jail
directories, carries our marker and is found by ``gc`` without a record). Skipping fsync keeps
the half-dozen record updates of a VM start off its start-up time.

Trust: the directory must be a real directory (not a symlink), owned by us and not writable
by group or others; otherwise every operation is refused, because anyone who can write a
record could make ``gc`` kill a process or delete a directory of their choosing.

This module imports nothing from :mod:`ironclaw_orchestrator.vm`, so the VM code can depend
on it without an import cycle.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import names
from .errors import ConfigError, RegistryError
from .procfs import describe_process, is_alive, read_start_time
from .safefs import replace_file

__all__ = [
    "DEFAULT_STATE_DIR",
    "STATE_DIR_ENV",
    "CorruptRecord",
    "Registry",
    "RegistryScan",
    "VmRecord",
    "VmState",
    "default_state_dir",
    "describe_process",
    "is_alive",
    "read_process_start",
]

log = logging.getLogger(__name__)

STATE_DIR_ENV = "IRONCLAW_STATE_DIR"
DEFAULT_STATE_DIR = Path("/run/ironclaw/registry")
RECORD_SUFFIX = ".json"
LOG_SUFFIX = ".log"
LOCK_NAME = ".lock"
#: Format of a record file; bumped when a field changes meaning.
RECORD_FORMAT = 1

VmState = Literal["starting", "running", "stopping"]


def default_state_dir() -> Path:
    """``$IRONCLAW_STATE_DIR`` if set, else ``/run/ironclaw/registry`` for root, else a
    per-user directory (see :mod:`ironclaw_orchestrator.paths`)."""
    from .paths import default_state_dir as _default

    return _default()


def check_vm_id(vm_id: str) -> str:
    """Reject ids that are not safe as file names (and everywhere else we use them)."""
    return names.check_id(vm_id, "vm_id")


# --------------------------------------------------------------------------- processes

#: Kept under their old names: process identity lives in :mod:`.procfs`.
read_process_start = read_start_time


# --------------------------------------------------------------------------- records


class VmRecord(BaseModel):
    """What the registry knows about one VM. Fields stay ``None`` until the thing exists.

    Resource fields (``run_dir`` .. ``tap``) name only what *we* created for this VM, so
    garbage collection removes exactly those.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    format: int = RECORD_FORMAT
    vm_id: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    state: VmState = "starting"
    #: ``True`` jailed, ``False`` development mode; ``None`` until the VMM runs.
    sandboxed: bool | None = None
    #: A supervisor process owns it (``ironclaw vm start -d``).
    detached: bool = False
    #: The orchestrator / supervisor process that owns the VM.
    owner_pid: int
    owner_start_time: int
    vmm_pid: int | None = None
    vmm_start_time: int | None = None
    uid: int | None = None
    gid: int | None = None
    run_dir: Path | None = None
    jail_dir: Path | None = None
    #: ``VmCgroups.to_dict()``.
    cgroups: dict[str, Any] | None = None
    #: Only a namespace we created (never one the user passed in).
    netns_name: str | None = None
    tap: str | None = None
    #: We created a veth uplink from ``netns_name`` to the host.
    uplink: bool = False
    api_socket: Path | None = None
    console_path: Path | None = None
    #: Output of the supervisor of a detached VM.
    log_path: Path | None = None
    vcpus: int | None = None
    memory_mb: int | None = None
    memory_limit_mb: int | None = None
    #: ``VmConfig.model_dump(mode="json")``, for ``ironclaw vm ls``.
    config: dict[str, Any] | None = None

    def owner_alive(self) -> bool:
        return is_alive(self.owner_pid, self.owner_start_time)

    def vmm_alive(self) -> bool:
        return is_alive(self.vmm_pid, self.vmm_start_time)


_FIELDS = frozenset(VmRecord.model_fields) - {"format", "vm_id"}


@dataclass(frozen=True)
class CorruptRecord:
    """A record file that could not be read or parsed."""

    path: Path
    error: str


@dataclass
class RegistryScan:
    """Every record that could be read, and every file that could not."""

    records: list[VmRecord] = field(default_factory=list)
    problems: list[CorruptRecord] = field(default_factory=list)


# --------------------------------------------------------------------------- registry


class Registry:
    """The VM registry in ``state_dir`` (created 0700 if missing; see the module docstring)."""

    def __init__(self, state_dir: Path | str | None = None, *, durable: bool = False) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        #: fsync every write (see the module docstring for why it is off by default).
        self.durable = durable
        self._ensure_state_dir()

    # ------------------------------------------------------------------ paths

    def record_path(self, vm_id: str) -> Path:
        return self.state_dir / f"{check_vm_id(vm_id)}{RECORD_SUFFIX}"

    def log_path(self, vm_id: str) -> Path:
        return self.state_dir / f"{check_vm_id(vm_id)}{LOG_SUFFIX}"

    @property
    def lock_path(self) -> Path:
        return self.state_dir / LOCK_NAME

    # ------------------------------------------------------------------ state directory

    def _ensure_state_dir(self) -> None:
        path = self.state_dir
        if not path.is_absolute():
            path = self.state_dir = Path.cwd() / path
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
        self._check_state_dir(path, st)

    @staticmethod
    def _check_state_dir(path: Path, st: os.stat_result) -> None:
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

    # ------------------------------------------------------------------ locking and I/O

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the registry's exclusive lock (``<state_dir>/.lock``, an ``flock``)."""
        try:
            fd = os.open(
                self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise RegistryError(
                f"cannot open the registry lock {self.lock_path}: {exc.strerror}; check the "
                "state directory (it must be ours, mode 0700, and the lock not a symlink)"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _fsync_dir(self) -> None:
        if not self.durable:
            return
        fd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_tmp(self, vm_id: str, data: bytes) -> Path:
        """Write ``data`` to a new, fsynced temporary file next to the record."""
        tmp = self.state_dir / f".{vm_id}{RECORD_SUFFIX}.{secrets.token_hex(6)}.tmp"
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self.durable:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        os.close(fd)
        return tmp

    @staticmethod
    def _encode(record: VmRecord) -> bytes:
        return record.model_dump_json().encode() + b"\n"

    def _read(self, path: Path) -> VmRecord:
        """Parse one record file; ``RegistryError`` if unreadable or invalid."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise RegistryError(f"cannot read VM record {path}: {exc.strerror}") from exc
        try:
            record = VmRecord.model_validate_json(raw)
        except (ValueError, ValidationError) as exc:
            raise RegistryError(
                f"VM record {path} is corrupt ({str(exc).splitlines()[0]}); run `ironclaw gc`, "
                "which moves it aside"
            ) from exc
        if record.format != RECORD_FORMAT:
            raise RegistryError(
                f"VM record {path} has format {record.format}, this ironclaw reads format "
                f"{RECORD_FORMAT}; use the ironclaw version that wrote it"
            )
        if f"{record.vm_id}{RECORD_SUFFIX}" != path.name:
            raise RegistryError(
                f"VM record {path} names VM {record.vm_id!r}, not its file name; it is corrupt: "
                "run `ironclaw gc`, which moves it aside"
            )
        return record

    def _make(self, vm_id: str, fields: dict[str, Any], base: VmRecord | None) -> VmRecord:
        unknown = set(fields) - _FIELDS
        if unknown:
            raise ConfigError(
                f"VM {vm_id}: unknown registry field(s) {sorted(unknown)}; known fields: "
                f"{sorted(_FIELDS)}"
            )
        data = base.model_dump() if base is not None else {}
        data.update(fields)
        data["vm_id"] = vm_id
        try:
            return VmRecord.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"VM {vm_id}: invalid registry record: {exc}") from exc

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
            start = read_process_start(int(fields["owner_pid"]))
            if start is None:
                raise RegistryError(
                    f"VM {vm_id}: cannot read the start time of owner pid {fields['owner_pid']} "
                    "(is /proc mounted, and the process alive?)"
                )
            fields["owner_start_time"] = start
        path = self.record_path(vm_id)
        with self.locked():
            if allocate_ids and os.path.lexists(path):
                raise self._in_use_error(vm_id)  # before scanning for free ids
            if allocate_ids:
                n = self._free_id(vm_id)
                fields.update(uid=n, gid=n)
            record = self._make(vm_id, fields, None)
            tmp = self._write_tmp(vm_id, self._encode(record))
            try:
                # link() fails with EEXIST if the id is taken: an atomic create-with-content.
                os.link(tmp, path)
            except FileExistsError:
                raise self._in_use_error(vm_id) from None
            except OSError as exc:
                raise RegistryError(
                    f"VM {vm_id}: cannot create the record {path}: {exc.strerror}"
                ) from exc
            finally:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            self._fsync_dir()
        return record

    def _in_use_error(self, vm_id: str) -> RegistryError:
        path = self.record_path(vm_id)
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
        try:
            return self._read(self.record_path(vm_id))
        except FileNotFoundError:
            return None

    def update(self, vm_id: str, **fields: Any) -> VmRecord:
        """Change fields of an existing record atomically; ``RegistryError`` if it is gone."""
        path = self.record_path(vm_id)
        with self.locked():
            try:
                current = self._read(path)
            except FileNotFoundError:
                raise RegistryError(
                    f"VM {vm_id} has no record in {self.state_dir} (released, or removed by "
                    "`ironclaw gc`); cannot update it"
                ) from None
            record = self._make(vm_id, fields, current)
            self._replace(vm_id, record)
        return record

    def _replace(self, vm_id: str, record: VmRecord) -> None:
        tmp = self._write_tmp(vm_id, self._encode(record))
        try:
            replace_file(tmp, self.record_path(vm_id))
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise RegistryError(
                f"VM {vm_id}: cannot write its record in {self.state_dir}: {exc.strerror}"
            ) from exc
        self._fsync_dir()

    def release(self, vm_id: str) -> None:
        """Delete the record (and the supervisor log) of ``vm_id``; idempotent.

        This also frees its uid/gid. Call it only once everything the record names is gone.
        """
        with self.locked():
            for path in (self.record_path(vm_id), self.log_path(vm_id)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            self._fsync_dir()

    def scan(self) -> RegistryScan:
        """Every record, plus the files that could not be parsed (never raises for those)."""
        result = RegistryScan()
        try:
            names = sorted(os.listdir(self.state_dir))
        except OSError as exc:
            raise RegistryError(f"cannot list the state directory {self.state_dir}: {exc}") from exc
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
        with self.locked():
            os.replace(path, target)
            self._fsync_dir()
        return target

    def allocate_ids(self, vm_id: str, first: int = 64_000, count: int = 1_000) -> tuple[int, int]:
        """Give the claimed ``vm_id`` a uid and gid no other record uses; return ``(uid, gid)``.

        Picks the lowest ``n`` in ``[first, first + count)`` used by no record (as uid or gid)
        and by no account or group of this host, stores ``uid = gid = n`` in the record, all
        under the registry lock, so concurrent orchestrators never pick the same ids. Ids are
        freed with the record. Idempotent: a record that already has ids keeps them.
        """
        if first < 1 or count < 1 or first + count > 2**32 - 1:
            raise ConfigError(f"uid range {first}..{first + count - 1} is invalid")
        path = self.record_path(vm_id)
        with self.locked():
            try:
                current = self._read(path)
            except FileNotFoundError:
                raise RegistryError(
                    f"VM {vm_id} has no record: claim the id before allocating its uid/gid"
                ) from None
            if current.uid is not None and current.gid is not None:
                return current.uid, current.gid
            n = self._free_id(vm_id, first, count)
            self._replace(vm_id, self._make(vm_id, {"uid": n, "gid": n}, current))
            return n, n

    def _used_ids(self) -> tuple[set[int], int]:
        """uids/gids named by the records, and how many record files could not be read.

        Only the two fields are read (plain JSON, no model validation): this runs under the
        lock for every VM started, over every record, so it must stay cheap.
        """
        used: set[int] = set()
        problems = 0
        try:
            names = os.listdir(self.state_dir)
        except OSError as exc:
            raise RegistryError(f"cannot list the state directory {self.state_dir}: {exc}") from exc
        for name in names:
            if name.startswith(".") or not name.endswith(RECORD_SUFFIX):
                continue
            try:
                fd = os.open(self.state_dir / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                with os.fdopen(fd, "rb") as f:
                    raw = f.read()
            except FileNotFoundError:
                continue  # released meanwhile
            except OSError:
                problems += 1
                continue
            ids = _ids_of(raw)
            if ids is None:
                problems += 1
            else:
                used.update(ids)
        return used, problems

    def _free_id(self, vm_id: str, first: int = 64_000, count: int = 1_000) -> int:
        """The lowest id in ``[first, first + count)`` no record and no host account uses.

        Call with the registry lock held.
        """
        used, problems = self._used_ids()
        if problems:
            log.warning(
                "allocating ids for VM %s while %d record(s) are unreadable: their ids are "
                "unknown (run `ironclaw gc`)",
                vm_id,
                problems,
            )
        for n in range(first, first + count):
            if n not in used and not _host_has_id(n):
                return n
        raise RegistryError(
            f"VM {vm_id}: all {count} uids/gids from {first} are in use by other VMs; stop some "
            "VMs, run `ironclaw gc` to free leftovers, or widen the range"
        )


def _ids_of(raw: bytes) -> list[int] | None:
    """``uid``/``gid`` of a record file's JSON (``None`` if it is not a JSON object)."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    return [v for v in (data.get("uid"), data.get("gid")) if type(v) is int]


def _host_has_id(n: int) -> bool:
    """True if ``n`` is the uid of an account or the gid of a group on this host."""
    import grp
    import pwd

    try:
        pwd.getpwuid(n)
        return True
    except KeyError:
        pass
    try:
        grp.getgrgid(n)
        return True
    except KeyError:
        return False
