"""A snapshot directory: its layout, manifest, and verification before anyone uses it.

A snapshot is a directory::

    manifest.json   VmConfig, firecracker version, type, creation time, size + SHA-256 of
                    each file, the jail-relative names the VM state refers to
    memory          guest memory (Firecracker's mem file)
    vmstate         the VMM/device state
    rootfs.ext4     the root drive as it was at the pause (reflink or sparse copy), if any

:meth:`Snapshot.load` verifies every file's size and SHA-256 against the manifest (once per
process while nothing changes, :mod:`.snapshot_cache`); a directory whose name says it is
incomplete is refused. Taking snapshots: :mod:`.snapshot`; sealing them: :mod:`.snapshot_seal`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import ConfigError, VersionMismatchError
from .binaries import Version
from .config import VmConfig
from .snapshot_cache import Fingerprint, VerifiedCache, fingerprint

__all__ = [
    "CLONE_MEMORY",
    "CLONE_STATE",
    "FORMAT",
    "INCOMPLETE",
    "JAIL_SNAPSHOT_DIR",
    "LAYER",
    "MANIFEST",
    "MEMORY",
    "ROOTFS",
    "VMSTATE",
    "BaseRef",
    "FileEntry",
    "Progress",
    "Snapshot",
    "SnapshotManifest",
    "sha256_file",
]

MANIFEST = "manifest.json"
MEMORY = "memory"
#: Firecracker's dirty-page layer of a Diff snapshot, merged into ``memory`` and removed.
LAYER = "memory.layer"
VMSTATE = "vmstate"
ROOTFS = "rootfs.ext4"
FORMAT = 1
INCOMPLETE = ".incomplete-"
#: Where snapshot files are written inside the source VM's jail (``snapshot-<hex>`` beside it).
JAIL_SNAPSHOT_DIR = PurePosixPath("/snapshot")
#: Where a clone's jail holds the snapshot's memory and VM state: its root (a directory for
#: them would cost every restore a directory creation and removal).
CLONE_MEMORY = PurePosixPath("/") / MEMORY
CLONE_STATE = PurePosixPath("/") / VMSTATE
#: ``(phase, bytes done, bytes total)``: copying the drive, hashing.
Progress = Callable[[str, int, int], None]
_CHUNK = 1 << 20


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    size: int
    sha256: str


class BaseRef(BaseModel):
    """The snapshot a Diff snapshot was merged onto (provenance; the Diff is complete)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    created_at: datetime
    memory_sha256: str


class SnapshotManifest(BaseModel):
    """``manifest.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int
    snapshot_type: Literal["Full", "Diff"]
    firecracker_version: str
    created_at: datetime
    source_vm_id: str
    #: ``VmConfig.model_dump(mode="json")`` of the source VM.
    config: dict[str, Any]
    mem_size_mib: int
    files: dict[str, FileEntry]
    #: Jail-relative names inside the VM state that a restore must recreate.
    rootfs_jail_path: str | None
    tap: str | None
    vsock_uds_path: str | None
    #: Diff snapshots: the base the dirty pages were merged onto, and their size in bytes.
    base: BaseRef | None = None
    dirty_bytes: int | None = None


@dataclass
class Snapshot:
    """A verified snapshot directory. Build with :meth:`load` (or :func:`take_snapshot`)."""

    path: Path
    manifest: SnapshotManifest
    #: name -> (device, inode, size, mtime_ns) when verified: a later change is refused.
    fingerprints: dict[str, Fingerprint] = field(default_factory=dict)
    #: What restores derive from the (immutable) manifest once per snapshot instead of once
    #: per clone, e.g. the validated clone config (:func:`.restore.clone_config`).
    derived: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def config(self) -> VmConfig:
        """The source VM's config (a new object each time; validated once per snapshot)."""
        return self.source_config().model_copy(deep=True)

    def source_config(self) -> VmConfig:
        """The source VM's config, shared: callers must not change it (see :attr:`config`)."""
        config = self.derived.get("config")
        if config is None:
            config = self.derived["config"] = VmConfig(**self.manifest.config)
        assert isinstance(config, VmConfig)
        return config

    @functools.cached_property
    def version(self) -> Version:
        return Version.parse(self.manifest.firecracker_version)

    @property
    def memory_path(self) -> Path:
        return self.path / MEMORY

    @property
    def state_path(self) -> Path:
        return self.path / VMSTATE

    @property
    def rootfs_path(self) -> Path | None:
        return self.path / ROOTFS if ROOTFS in self.manifest.files else None

    @classmethod
    def load(cls, path: Path | str, *, firecracker_version: Version | None = None) -> Snapshot:
        """Read and verify the snapshot in ``path`` (every file's size and SHA-256).

        Raises ``ConfigError`` for a missing, incomplete, truncated or altered snapshot and
        ``VersionMismatchError`` if ``firecracker_version`` differs from the one that wrote it.

        A directory this process verified (or wrote) before is not hashed again while every
        file keeps its inode, size and mtime and only we can write them
        (:mod:`.snapshot_cache`): clones of one snapshot pay for the hashing once.
        """
        path = Path(path)
        if INCOMPLETE in path.name:
            raise ConfigError(
                f"snapshot {path} is incomplete (its writer was interrupted): remove it and "
                "take the snapshot again"
            )
        cached = _VERIFIED.get(path)
        if cached is not None:
            (manifest, derived), prints = cached
            prints = {n: p for n, p in prints.items() if n != MANIFEST}
            snap = cls(path, manifest, prints, derived)  # derived: once per directory
        else:
            snap = cls._verify(path)
        if firecracker_version is not None:
            snap.check_version(firecracker_version)
        return snap

    @classmethod
    def _verify(cls, path: Path) -> Snapshot:
        started = time.time_ns()
        try:
            manifest_print = fingerprint((path / MANIFEST).lstat())  # before it is read
        except OSError:
            manifest_print = None  # reported by _read_manifest
        manifest = _read_manifest(path)
        snap = cls(path, manifest)
        for name, entry in manifest.files.items():
            file = path / name
            try:
                st = file.stat()
            except OSError as exc:
                raise ConfigError(
                    f"snapshot {path}: {name} is missing or unreadable ({exc.strerror}): the "
                    "snapshot is damaged; take it again"
                ) from None
            if st.st_size != entry.size:
                raise ConfigError(
                    f"snapshot {path}: {name} is {st.st_size} bytes, the manifest says "
                    f"{entry.size} (truncated or replaced): take the snapshot again"
                )
            digest = sha256_file(file)
            if digest != entry.sha256:
                raise ConfigError(
                    f"snapshot {path}: {name} has SHA-256 {digest}, the manifest says "
                    f"{entry.sha256} (altered): take the snapshot again"
                )
            snap.fingerprints[name] = fingerprint(st)
        if manifest_print is not None:
            prints = {**snap.fingerprints, MANIFEST: manifest_print}
            _VERIFIED.put(
                path, (manifest, snap.derived), prints, started_ns=started, exempt={MANIFEST}
            )
        return snap

    def check_version(self, running: Version) -> None:
        if running.release != self.version.release:
            raise VersionMismatchError(
                f"snapshot {self.path} was written by Firecracker {self.version} but this host "
                f"runs {running}: Firecracker only loads snapshots of its own release here; "
                "restore with the same release (exec_file / IRONCLAW_FIRECRACKER)"
            )

    def check_unchanged(self) -> None:
        """Refuse files changed since :meth:`load` verified them (cheap: no re-hashing)."""
        for name, expected in self.fingerprints.items():
            try:
                st = (self.path / name).stat()
            except OSError as exc:
                raise ConfigError(
                    f"snapshot {self.path}: {name} disappeared after it was verified "
                    f"({exc.strerror}); load the snapshot again"
                ) from None
            if fingerprint(st) != expected:
                raise ConfigError(
                    f"snapshot {self.path}: {name} changed after it was verified; "
                    "Snapshot.load() it again"
                )
        if set(self.fingerprints) != set(self.manifest.files):
            raise ConfigError(f"snapshot {self.path} was not verified: use Snapshot.load()")


#: Snapshot directories verified by this process (see :mod:`.snapshot_cache`).
#: With each its manifest and ``Snapshot.derived`` (shared by every load of the directory).
_VERIFIED: VerifiedCache[tuple[SnapshotManifest, dict[str, Any]]] = VerifiedCache()


def _read_manifest(path: Path) -> SnapshotManifest:
    file = path / MANIFEST
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{path} is not a snapshot ({MANIFEST} missing): it may be incomplete; take the "
            "snapshot again"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"snapshot manifest {file} is unreadable: {exc}") from None
    try:
        manifest = SnapshotManifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"snapshot manifest {file} is invalid: {where}: {first['msg']}") from None
    if manifest.format != FORMAT:
        raise ConfigError(
            f"snapshot {path} has format {manifest.format}; this version reads {FORMAT}"
        )
    expected = {MEMORY, VMSTATE} | ({ROOTFS} if manifest.rootfs_jail_path else set())
    if set(manifest.files) != expected:
        raise ConfigError(
            f"snapshot manifest {file} lists {sorted(manifest.files)}, not {sorted(expected)}"
        )
    return manifest


def sha256_file(path: Path, progress: Progress | None = None, done: int = 0, total: int = 0) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress("hash", done, total)
    return h.hexdigest()
