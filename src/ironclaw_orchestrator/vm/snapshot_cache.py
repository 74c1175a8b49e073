"""Which snapshot directories this process has verified already (so clones skip re-hashing).

Hashing a 128 MiB snapshot costs ~100 ms of CPU; a fork of many clones from one directory
should pay that once. :class:`VerifiedCache` remembers, per snapshot directory (symlinks
resolved), the manifest it verified and each file's fingerprint: device, inode, size and
modification time. A later load trusts that verification only if

* the directory is still owned by us and writable by no one else (as sealed: 0700), and
  every file is owned by us and read-only for everyone (0444), so only we could change it;
* every file, the manifest included, still has the same fingerprint (a replaced, truncated
  or rewritten file has a new inode, size or mtime).

* each file was last modified well before the verification began: file times come from a
  coarse clock (a tick of up to 10 ms), so a same-size rewrite within the tick of the
  verified write could keep the mtime; such a file is simply verified again next time.

Anything else is hashed again. The change time is not part of the fingerprint: hard-linking
a file into a clone's jail changes it. The manifest itself is not re-read from a cached
directory (the verified one is used). The cache lives in this process only.
"""

from __future__ import annotations

import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Generic, TypeVar

__all__ = ["Fingerprint", "VerifiedCache", "fingerprint"]

#: ``(st_dev, st_ino, st_size, st_mtime_ns)``
Fingerprint = tuple[int, int, int, int]
M = TypeVar("M")
_MAX_ENTRIES = 64
#: Files modified this close to (or after) the start of their verification are not trusted.
_MTIME_MARGIN_NS = 50_000_000


def fingerprint(st: os.stat_result) -> Fingerprint:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _sealed_file(st: os.stat_result) -> bool:
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_uid == os.geteuid()
        and not st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    )


def _sealed_dir(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (
        stat.S_ISDIR(st.st_mode)
        and st.st_uid == os.geteuid()
        and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


class VerifiedCache(Generic[M]):
    """Snapshot directory -> (manifest, fingerprints) of its last full verification here."""

    def __init__(self) -> None:
        self._entries: OrderedDict[str, tuple[M, dict[str, Fingerprint], frozenset[str]]]
        self._entries = OrderedDict()
        self._lock = threading.Lock()

    def put(
        self,
        path: Path,
        manifest: M,
        fingerprints: dict[str, Fingerprint],
        *,
        started_ns: int,
        exempt: Iterable[str] = (),
    ) -> None:
        """Remember a verification that began at ``started_ns`` (``time.time_ns()``):
        ``fingerprints`` of every file, the manifest included. Files modified too close to
        the start are left out of the trust (the whole directory is verified again), except
        ``exempt`` ones (the manifest, which a cached load does not read)."""
        key = os.path.realpath(path)
        fresh = [
            n
            for n, p in fingerprints.items()
            if n not in exempt and p[3] > started_ns - _MTIME_MARGIN_NS
        ]
        with self._lock:
            if fresh:
                self._entries.pop(key, None)
                return
            self._entries[key] = (manifest, dict(fingerprints), frozenset(exempt))
            self._entries.move_to_end(key)
            while len(self._entries) > _MAX_ENTRIES:
                self._entries.popitem(last=False)

    def get(
        self, path: Path, names: Iterable[str] | None = None
    ) -> tuple[M, dict[str, Fingerprint]] | None:
        """The manifest verified for ``path`` and the fingerprints, if nothing changed since
        (see the module doc); ``names`` are the files that must be covered."""
        key = os.path.realpath(path)
        with self._lock:
            entry = self._entries.get(key)
        if entry is None or not _sealed_dir(Path(key)):
            return None
        manifest, prints, _ = entry
        if names is not None and set(names) != set(prints):
            return None
        for name, expected in prints.items():
            try:
                st = os.lstat(os.path.join(key, name))
            except OSError:
                return None
            if fingerprint(st) != expected or not _sealed_file(st):
                return None
        return manifest, dict(prints)

    def forget(self, path: Path) -> None:
        with self._lock:
            self._entries.pop(os.path.realpath(path), None)
