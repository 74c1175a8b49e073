"""uid/gid allocation: the lowest id no record and no host account or group uses.

Called under the registry's exclusive lock, so concurrent orchestrators never pick the same
id; the ids of a VM are freed with its record. Only the ``uid``/``gid`` of each record are
read (plain JSON, no model validation): this runs for every VM started, over every record.
"""

from __future__ import annotations

import json
import logging
import os
import time

from ..errors import RegistryError
from .record import RECORD_SUFFIX

__all__ = ["DEFAULT_COUNT", "DEFAULT_FIRST", "free_id", "host_has_id", "ids_of", "used_ids"]

log = logging.getLogger(__name__)

DEFAULT_FIRST = 64_000
DEFAULT_COUNT = 1_000


def ids_of(raw: bytes) -> list[int] | None:
    """``uid``/``gid`` of a record file's JSON (``None`` if it is not a JSON object)."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    return [v for v in (data.get("uid"), data.get("gid")) if type(v) is int]


def used_ids(state_dir: str) -> tuple[set[int], int]:
    """uids/gids named by the records in ``state_dir``, and how many could not be read."""
    used: set[int] = set()
    problems = 0
    try:
        names = os.listdir(state_dir)
    except OSError as exc:
        raise RegistryError(f"cannot list the state directory {state_dir}: {exc}") from exc
    for name in names:
        if name.startswith(".") or not name.endswith(RECORD_SUFFIX):
            continue
        try:
            fd = os.open(f"{state_dir}/{name}", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            continue  # released meanwhile
        except OSError:
            problems += 1
            continue
        ids = ids_of(raw)
        if ids is None:
            problems += 1
        else:
            used.update(ids)
    return used, problems


def free_id(
    state_dir: str, vm_id: str, first: int = DEFAULT_FIRST, count: int = DEFAULT_COUNT
) -> int:
    """The lowest id in ``[first, first + count)`` no record and no host account uses.

    Call with the registry lock held.
    """
    used, problems = used_ids(state_dir)
    if problems:
        log.warning(
            "allocating ids for VM %s while %d record(s) are unreadable: their ids are "
            "unknown (run `ironclaw gc`)",
            vm_id,
            problems,
        )
    for n in range(first, first + count):
        if n not in used and not host_has_id(n):
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
    "taken" only makes the allocator skip an id for a few seconds.
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
