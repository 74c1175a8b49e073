"""uid/gid allocation: the lowest id no record and no host account or group uses.

Called under the registry's exclusive lock, so concurrent orchestrators never pick the same
id; the ids of a VM are freed with its record. Only the ``uid``/``gid`` of each record are
read (plain JSON, no model validation), and only when another process changed them: each
process keeps the ids of every record (:class:`UsedIds`), valid for one *generation* of the
registry, a counter in the lock file bumped before any change of the ids (see
:class:`UsedIds` for why that is exact).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..errors import RegistryError
from .record import RECORD_SUFFIX

if TYPE_CHECKING:
    from .store import LockFile

__all__ = [
    "DEFAULT_COUNT",
    "DEFAULT_FIRST",
    "UsedIds",
    "changing",
    "free_id",
    "host_has_id",
    "ids_of",
    "read_ids",
    "used_ids",
    "vet_candidate",
]

log = logging.getLogger(__name__)

DEFAULT_FIRST = 64_000
DEFAULT_COUNT = 1_000

#: The ids of one record file: ``(uid, gid)`` without the unset ones; ``None`` if unreadable.
Ids = tuple[int, ...] | None


def ids_of(raw: bytes) -> list[int] | None:
    """``uid``/``gid`` of a record file's JSON (``None`` if it is not a JSON object)."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    return [v for v in (data.get("uid"), data.get("gid")) if type(v) is int]


def ids_tuple(uid: int | None, gid: int | None) -> tuple[int, ...]:
    """The ids of a record with ``uid``/``gid``, as :func:`read_ids` gives them."""
    if uid is None:
        return () if gid is None else (gid,)
    return (uid,) if gid is None else (uid, gid)


def read_ids(path: str) -> Ids:
    """The ids in the record file ``path`` (``None`` if unreadable; ``FileNotFoundError``
    if it is gone). Every read of a record for its ids goes through here (work-count
    tests count the calls)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise
    except OSError:
        return None
    found = ids_of(raw)
    return None if found is None else tuple(found)


def scan_ids(state_dir: str) -> dict[str, Ids]:
    """The ids of every record file in ``state_dir``, by file name."""
    try:
        names = os.listdir(state_dir)
    except OSError as exc:
        raise RegistryError(f"cannot list the state directory {state_dir}: {exc}") from exc
    found: dict[str, Ids] = {}
    for name in names:
        if name.startswith(".") or not name.endswith(RECORD_SUFFIX):
            continue
        with contextlib.suppress(FileNotFoundError):  # released meanwhile
            found[name] = read_ids(f"{state_dir}/{name}")
    return found


def used_ids(state_dir: str) -> tuple[set[int], int]:
    """uids/gids named by the records in ``state_dir``, and how many could not be read."""
    table = UsedIds()
    table.load(scan_ids(state_dir))
    return set(table.count), table.problems


class UsedIds:
    """A process's copy of the ids of every record in a state directory, and the
    generation of the registry it is valid for (``None``: not known).

    The generation is a counter in the lock file (:meth:`.LockFile.generation`). Every
    change of the ids a record file holds (a record created with ids, ids set or changed,
    a record removed or moved aside) is made under the exclusive lock by :func:`changing`,
    which bumps the counter *before* the change, in the same hold. A copy is stamped with
    generation ``g`` only by a full scan made under the lock while the file held ``g``, or
    by the process whose own bump made ``g``, once its change is made, from a copy valid
    for ``g - 1``. So while the file still holds ``g`` nobody has started a change since,
    and the copy is exact; any change, by any process, moves the counter away from every
    copy stamped before it, and the next allocation rescans. A process killed between its
    bump and its change costs the others one needless rescan: nobody's copy carries the
    new generation. The counter only grows (64 bits do not wrap) within one lock file; a
    copy belongs to the open lock file and is dropped when the file is reopened (it was
    replaced, evicted, or this is a forked child), so a recreated lock file, whose counter
    starts again at 0, is never compared with a copy of the old one. Files put into the
    state directory by hand are not seen until the next rescan.

    An ironclaw older than this does not bump the counter (its lock file is empty, which
    reads as generation 0): records it writes while a newer process runs are invisible to
    that process's copy, which could hand out their ids again. Hence the rule of the
    README (troubleshooting): upgrade every ironclaw on a host at once.
    """

    __slots__ = ("by_name", "count", "generation", "problems")

    def __init__(self) -> None:
        self.generation: int | None = None
        #: Ids by record file name (records without ids left out; ``None``: unreadable).
        self.by_name: dict[str, Ids] = {}
        #: How many records use each id (kept as records change: no pass over them all).
        self.count: dict[int, int] = {}
        #: Records that could not be read.
        self.problems = 0

    def drop(self) -> None:
        self.load({})
        self.generation = None

    def load(self, by_name: dict[str, Ids]) -> None:
        self.by_name, self.count, self.problems = {}, {}, 0
        for name, found in by_name.items():
            self.set(name, found)

    def set(self, name: str, found: Ids) -> None:
        """Record file ``name`` now holds ``found`` (``()``: no ids, or no file)."""
        self._add(self.by_name.pop(name, ()), -1)
        if found != ():
            self.by_name[name] = found
            self._add(found, 1)

    def _add(self, found: Ids, k: int) -> None:
        if found is None:
            self.problems += k
            return
        for n in found:
            left = self.count.get(n, 0) + k
            if left:
                self.count[n] = left
            else:
                del self.count[n]

    def sync(self, lock: LockFile, state_dir: str) -> None:
        """Make the copy valid for the lock file's generation (lock held exclusively)."""
        generation = lock.generation()
        if self.generation != generation:
            self.load(scan_ids(state_dir))
            self.generation = generation


_UNKNOWN: Ids = (-1,)


_SAME: contextlib.nullcontext[None] = contextlib.nullcontext()


def changing(
    lock: LockFile, state_dir: str, name: str, after: tuple[int, ...], before: Ids = _UNKNOWN
) -> contextlib.AbstractContextManager[None]:
    """Around a change of the record file ``name`` (lock held exclusively) that leaves it
    with the ids ``after`` (``()`` if it is removed): bumps the generation first, unless
    the ids stay ``before`` (where not given: what a valid copy says, else the file). A
    change that raises leaves the ids unknown: the copy is dropped."""
    if before is not _UNKNOWN and before == after:
        return _SAME  # most updates: nothing to announce
    return _changing(lock, state_dir, name, after, before)


@contextlib.contextmanager
def _changing(
    lock: LockFile, state_dir: str, name: str, after: tuple[int, ...], before: Ids
) -> Iterator[None]:
    table = lock.used
    generation = None
    if before is _UNKNOWN:
        generation = lock.generation()
        if table.generation == generation:
            before = table.by_name.get(name, ())
        else:  # one read spares every other process a rescan if no id changes
            try:
                before = read_ids(f"{state_dir}/{name}")
            except FileNotFoundError:
                before = ()
    if before == after:
        yield
        return
    if generation is None:
        generation = lock.generation()
    current = table.generation == generation
    lock.set_generation(generation + 1)
    try:
        yield
    except BaseException:
        table.drop()
        raise
    if current:
        table.set(name, after)
        table.generation = generation + 1


def vet_candidate(
    lock: LockFile, first: int = DEFAULT_FIRST, count: int = DEFAULT_COUNT
) -> int | None:
    """Before taking the registry lock: the id :func:`free_id` will most likely pick (the
    lowest one free in ``lock``'s copy of the records' ids, which may be stale, and in NSS),
    or ``None`` if there is none.

    The NSS lookup (~0.17 ms, the larger part of a claim) is made here so that the
    exclusive lock is not held across it (the lock orders our records, not the host's
    accounts: NSS is no more exact under it). The answer is used for this one allocation
    only (see :func:`free_id`), so every id handed out is still looked up once, for it.
    """
    used = lock.used.count  # read without the lock: a hint only, checked under the lock
    for n in range(first, first + count):
        if n not in used and not host_has_id(n):  # a "taken" answer is remembered
            return n
    return None


def free_id(
    state_dir: str,
    vm_id: str,
    first: int = DEFAULT_FIRST,
    count: int = DEFAULT_COUNT,
    *,
    lock: LockFile | None = None,
    vetted: int | None = None,
) -> int:
    """The lowest id in ``[first, first + count)`` no record and no host account uses.

    Call with the registry lock held; with ``lock``, its copy of the records' ids is used
    (and brought up to date), else every record is read. ``vetted`` is an id NSS found
    free for this allocation just before the lock was taken (:func:`vet_candidate`): it is
    not looked up again if it is the lowest id no record uses; any other is.
    """
    used: set[int] | dict[int, int]
    if lock is None:
        used, problems = used_ids(state_dir)
    else:
        lock.used.sync(lock, state_dir)
        used, problems = lock.used.count, lock.used.problems
    if problems:
        log.warning(
            "allocating ids for VM %s while %d record(s) are unreadable: their ids are "
            "unknown (run `ironclaw gc`)",
            vm_id,
            problems,
        )
    for n in range(first, first + count):
        if n not in used and (n == vetted or not host_has_id(n)):
            return n
    raise RegistryError(
        f"VM {vm_id}: all {count} uids/gids from {first} are in use by other VMs; stop some "
        "VMs, run `ironclaw gc` to free leftovers, or widen the range"
    )


#: "Taken" answers of NSS, kept this long at most (and dropped when an account file changes).
HOST_ID_TTL_S = 10.0
_ACCOUNT_FILES = ("/etc/passwd", "/etc/group")
_host_ids: dict[int, bool] = {}
_host_ids_key: tuple[object, ...] = ()


def host_has_id(n: int) -> bool:
    """True if ``n`` is the uid of an account or the gid of a group on this host.

    Only "taken" answers of NSS (two lookups, ~0.16 ms) are remembered, for up to
    :data:`HOST_ID_TTL_S` and until ``/etc/passwd`` or ``/etc/group`` changes: an id
    found free is looked up afresh every time, because the lowest free id is the one handed
    out, and an account from another NSS source (systemd's dynamic users live in
    61184..65519, LDAP, ...) may have taken it since a VM last used it. A remembered
    "taken" only makes the allocator skip an id for a few seconds. The lookup of the id a
    claim hands out is made just before the registry lock is taken (:func:`vet_candidate`),
    for that claim only: the lock orders records, not the host's accounts.
    """
    global _host_ids, _host_ids_key
    key = (_account_files_key(), int(time.monotonic() // HOST_ID_TTL_S))
    if key != _host_ids_key:
        _host_ids, _host_ids_key = {}, key
    if _host_ids.get(n):
        return True
    taken = _nss_has_id(n)
    if taken:
        _host_ids[n] = True
    return taken


def _account_files_key() -> tuple[object, ...]:
    key: list[object] = []
    for path in _ACCOUNT_FILES:
        try:
            st = os.stat(path)
        except OSError:
            key.append(None)
        else:
            key.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(key)


def _nss_has_id(n: int) -> bool:
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
