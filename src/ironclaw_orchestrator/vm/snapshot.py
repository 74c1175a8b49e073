"""Snapshots of a running microVM: taking them, and verifying them before anyone uses one.

A snapshot is a directory::

    manifest.json   VmConfig, firecracker version, type, creation time, size + SHA-256 of
                    each file, the jail-relative names the VM state refers to
    memory          guest memory (Firecracker's mem file)
    vmstate         the VMM/device state
    rootfs.ext4     the root drive as it was at the pause (reflink or sparse copy), if any

A Diff snapshot (``diff=True``) is as complete as a Full one: Firecracker writes only the
pages dirtied since the VM's previous snapshot, which are merged onto a copy of that
snapshot's memory (:mod:`.snapshot_diff`); its manifest names the base and the base
memory's SHA-256, and how many bytes were dirty.

Files are 0444 root-owned in a 0700 directory: restores hard-link them into each clone's
jail (the memory file is mapped privately by Firecracker, so clones share its page cache and
can never write it); the writable root drive is copied per clone.

Crash safety: everything is built inside the source VM's jail directory (which the VM's
registry record names, so ``ironclaw gc`` removes it with the VM after a crash) and only
renamed to ``dest_dir`` once complete, manifest last. On another filesystem it is copied to
``.<name>.incomplete-<pid>`` beside ``dest_dir`` first; a crash there leaves a directory
without a manifest whose name says it is incomplete, which :meth:`Snapshot.load` refuses.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import ConfigError, StagingError, UsageError, VersionMismatchError
from .api import FirecrackerApi
from .binaries import Version
from .cancelsafe import ThreadSteps, finish
from .config import VmConfig
from .jailer import JailerProcess
from .snapshot_api import create_body, diff_needs_tracking
from .snapshot_cache import Fingerprint, VerifiedCache, fingerprint
from .snapshot_diff import check_reports_holes, merge_layer
from .staging import copy_extents, make_owned_dir

if TYPE_CHECKING:
    from . import FirecrackerProcess

__all__ = [
    "MANIFEST",
    "Snapshot",
    "SnapshotManifest",
    "SnapshotSource",
    "copy_sparse",
    "seal_snapshot",
    "snapshot_vm",
    "take_snapshot",
]

MANIFEST = "manifest.json"
MEMORY = "memory"
#: Firecracker's dirty-page layer of a Diff snapshot, merged into ``memory`` and removed.
LAYER = "memory.layer"
VMSTATE = "vmstate"
ROOTFS = "rootfs.ext4"
FORMAT = 1
INCOMPLETE = ".incomplete-"
#: Where snapshot files live inside a jail (the source's while writing, each clone's).
JAIL_SNAPSHOT_DIR = PurePosixPath("/snapshot")
#: ``(phase, bytes done, bytes total)``: copying the drive, hashing.
Progress = Callable[[str, int, int], None]
_CHUNK = 1 << 20
_FICLONE = 0x40049409


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

    @property
    def config(self) -> VmConfig:
        return VmConfig(**self.manifest.config)

    @property
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
            manifest, prints = cached
            snap = cls(path, manifest, {n: p for n, p in prints.items() if n != MANIFEST})
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
            _VERIFIED.put(path, manifest, prints, started_ns=started, exempt={MANIFEST})
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
_VERIFIED: VerifiedCache[SnapshotManifest] = VerifiedCache()


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


def copy_sparse(src: Path, dest: Path, progress: Progress | None = None) -> None:
    """Copy ``src`` to a new file ``dest``: reflink if possible, else only its data extents."""
    with open(src, "rb") as fin, open(dest, "xb") as fout:
        size = os.fstat(fin.fileno()).st_size
        try:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
            if progress is not None:
                progress("copy", size, size)
            return
        except OSError:
            pass  # no reflink here: copy data extents, leave holes as holes
        report = None if progress is None else (lambda done: progress("copy", done, size))
        copy_extents(fin.fileno(), fout.fileno(), size, report)


@dataclass(frozen=True)
class SnapshotSource:
    """What taking a snapshot needs of a running jailed VM (from a handle or a record)."""

    api: FirecrackerApi
    chroot_dir: Path
    uid: int
    gid: int
    version: Version
    config: VmConfig

    def host_path(self, jail_path: PurePosixPath) -> Path:
        return self.chroot_dir / str(jail_path).lstrip("/")


async def take_snapshot(
    vm: FirecrackerProcess,
    dest_dir: Path | str,
    *,
    diff: bool = False,
    resume: bool = True,
    progress: Progress | None = None,
) -> Snapshot:
    """Pause ``vm``, snapshot it into the new directory ``dest_dir``, resume it (unless not).

    ``diff=True`` writes a Diff snapshot (only pages dirtied since the last one; the VM must
    track dirty pages) on top of a copy of the previous snapshot's memory, so the result is
    still complete on its own.
    """
    vmm = vm.vmm
    if not isinstance(vmm, JailerProcess):
        raise UsageError(f"VM {vm.vm_id}: snapshots need a jailed VM (this one runs unjailed)")
    if not vmm.booted:
        raise UsageError(f"VM {vm.vm_id} was never started: there is nothing to snapshot")
    base = vm.last_snapshot if diff else None
    if diff and base is None:
        raise UsageError(
            f"VM {vm.vm_id}: a Diff snapshot needs an earlier snapshot of this VM to build on; "
            "take a full one first"
        )
    version = vmm.binaries.version
    if diff and not vm.config.track_dirty_pages and diff_needs_tracking(version):
        raise UsageError(
            f"VM {vm.vm_id}: Firecracker {version} writes Diff snapshots only of VMs that "
            "track dirty pages: start (or restore) it with track_dirty_pages = true, or take "
            "a Full snapshot"
        )
    cfg = vmm.config
    source = SnapshotSource(vmm.api, cfg.chroot_dir, cfg.uid, cfg.gid, version, vm.config)

    def created() -> None:
        # Firecracker has reset its dirty-page log: until this snapshot is sealed, no
        # earlier one is a valid base for a Diff (it would miss the pages just logged).
        vm.last_snapshot = None

    snap = await snapshot_vm(
        source, dest_dir, diff=diff, base=base, resume=resume, was_paused=vm.paused,
        progress=progress, on_created=created,
    )  # fmt: skip
    vm.paused = vm.paused or not resume
    vm.last_snapshot = snap
    return snap


async def snapshot_vm(
    source: SnapshotSource,
    dest_dir: Path | str,
    *,
    diff: bool = False,
    base: Snapshot | None = None,
    resume: bool = True,
    was_paused: bool | None = None,
    progress: Progress | None = None,
    on_created: Callable[[], None] | None = None,
) -> Snapshot:
    """Snapshot the VM behind ``source`` (see :func:`take_snapshot`).

    ``base`` (required with ``diff=True``) is the snapshot the dirty pages are merged onto;
    ``on_created`` is called once Firecracker has written the files.

    ``was_paused`` says whether the VM is paused already (then it is left paused); ``None``
    asks Firecracker. (A handle knows: on the nested test host, Firecracker v1.0 sometimes
    never answered a ``PATCH /vm`` sent right after a ``GET /`` to a busy guest.)
    """
    dest = Path(dest_dir)
    if dest.exists() or dest.is_symlink():
        raise ConfigError(f"snapshot destination {dest} already exists: choose a new directory")
    if not dest.parent.is_dir():
        raise ConfigError(f"snapshot destination's parent {dest.parent} does not exist: create it")
    if diff:
        if base is None:
            raise UsageError("a Diff snapshot needs the base snapshot to merge onto")
        base.check_unchanged()
        check_reports_holes(source.chroot_dir)
    jail_rel = JAIL_SNAPSHOT_DIR.with_name(f"snapshot-{secrets.token_hex(4)}")
    work = source.host_path(jail_rel)
    api = source.api
    paused = False
    steps = ThreadSteps()  # a copy cancelled mid-way still runs: waited for before undoing
    sealed: list[Snapshot] = []
    try:
        make_owned_dir(work, source.uid, source.gid)
        if was_paused is None:
            was_paused = (await api.describe()).get("state") == "Paused"
        if not was_paused:
            await api.pause()
            paused = True
        mem_name = LAYER if diff else MEMORY
        body = create_body(source.version, jail_rel / VMSTATE, jail_rel / mem_name, diff=diff)
        await api.create_snapshot(body)
        if on_created is not None:
            on_created()
        rootfs_jail = _rootfs_jail_path(source.config)
        if rootfs_jail is not None:
            await steps.run(copy_sparse, source.host_path(rootfs_jail), work / ROOTFS, progress)
        if paused and resume:
            await api.resume()
            paused = False
        dirty: int | None = None
        if diff:
            assert base is not None
            dirty = await steps.run(_merge_onto, base, work, progress)

        def seal() -> Snapshot:
            snap = seal_snapshot(
                work, dest, config=source.config, version=source.version, diff=diff,
                rootfs_jail=rootfs_jail, progress=progress, base=base, dirty_bytes=dirty,
            )  # fmt: skip
            sealed.append(snap)
            return snap

        return await steps.run(seal)
    except BaseException:
        # Runs to its end even if cancelled again. A seal that finished after the cancel
        # made ``dest``: removed too, since the caller gets no snapshot.
        resume_api = api if paused and resume else None
        await finish(_undo(steps, resume_api, work, dest, sealed))
        raise


async def _undo(
    steps: ThreadSteps,
    resume_api: FirecrackerApi | None,
    work: Path,
    dest: Path,
    sealed: list[Snapshot],
) -> None:
    await steps.settle()  # only now is it known whether the seal made ``dest``
    if resume_api is not None:
        with contextlib.suppress(Exception):
            await resume_api.resume()
    for path in (work, dest) if sealed else (work,):
        with contextlib.suppress(OSError):
            shutil.rmtree(path)


def _merge_onto(base: Snapshot, work: Path, progress: Progress | None) -> int:
    """``memory`` = the base's memory with the layer's dirty pages written over it."""
    base.check_unchanged()
    copy_sparse(base.memory_path, work / MEMORY, progress)
    dirty = merge_layer(work / LAYER, work / MEMORY)
    (work / LAYER).unlink()
    return dirty


def _rootfs_jail_path(config: VmConfig) -> PurePosixPath | None:
    from . import ROOTFS_JAIL_PATH

    return ROOTFS_JAIL_PATH if config.rootfs_path is not None else None


def seal_snapshot(
    work: Path,
    dest: Path,
    *,
    config: VmConfig,
    version: Version,
    diff: bool,
    rootfs_jail: PurePosixPath | None,
    progress: Progress | None = None,
    base: Snapshot | None = None,
    dirty_bytes: int | None = None,
) -> Snapshot:
    """Seal the files in ``work`` (0444, root), hash them, write the manifest last, and move
    the directory to ``dest``. ``config`` is the source VM's; ``base`` a Diff's base."""
    from . import netns as ns

    started = time.time_ns()
    names = [MEMORY, VMSTATE] + ([ROOTFS] if rootfs_jail is not None else [])
    total = sum((work / n).stat().st_size for n in names)
    files: dict[str, FileEntry] = {}
    done = 0
    for name in names:
        file = work / name
        _own(file)
        os.chmod(file, 0o444)
        size = file.stat().st_size
        files[name] = FileEntry(size=size, sha256=sha256_file(file, progress, done, total))
        done += size
    manifest = SnapshotManifest(
        format=FORMAT,
        snapshot_type="Diff" if diff else "Full",
        firecracker_version=str(version),
        created_at=datetime.now(UTC),
        source_vm_id=config.vm_id,
        config=_config_dump(config),
        mem_size_mib=config.memory_mb,
        files=files,
        rootfs_jail_path=str(rootfs_jail) if rootfs_jail is not None else None,
        tap=ns.tap_name(config.vm_id) if config.enable_networking else None,
        vsock_uds_path=str(config.vsock_uds_path) if config.vsock_guest_cid is not None else None,
        base=None if base is None else BaseRef(
            path=str(base.path), created_at=base.manifest.created_at,
            memory_sha256=base.manifest.files[MEMORY].sha256,
        ),
        dirty_bytes=dirty_bytes,
    )  # fmt: skip
    _own(work)
    os.chmod(work, 0o700)
    _write_manifest(work / MANIFEST, manifest)
    try:
        os.rename(work, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise StagingError(f"could not move the snapshot to {dest}: {exc.strerror}") from exc
        _copy_across(work, dest, names)
    return _verified(dest, manifest, started)


def _config_dump(config: VmConfig) -> dict[str, Any]:
    """The config as JSON; jail settings only where chosen, so that defaults and the
    binaries found on the restoring host still apply (e.g. ``exec_file``)."""
    data = config.model_dump(mode="json", exclude={"jailer"})
    if config.jailer is not None:
        data["jailer"] = config.jailer.model_dump(mode="json", exclude_unset=True)
    return data


def _own(path: Path) -> None:
    """Take a file written by the jailed VMM away from its uid (root writes snapshots)."""
    if os.geteuid() == 0:
        os.chown(path, 0, 0)


def _verified(dest: Path, manifest: SnapshotManifest, started_ns: int) -> Snapshot:
    """The snapshot just written: hashed as written (from ``started_ns``), so only
    fingerprinted here, and remembered as verified."""
    snap = Snapshot(dest, manifest)
    for name in manifest.files:
        snap.fingerprints[name] = fingerprint((dest / name).stat())
    prints = {**snap.fingerprints, MANIFEST: fingerprint((dest / MANIFEST).lstat())}
    _VERIFIED.put(dest, manifest, prints, started_ns=started_ns, exempt={MANIFEST})
    return snap


def _write_manifest(path: Path, manifest: SnapshotManifest) -> None:
    with open(path, "x") as f:
        f.write(manifest.model_dump_json(indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o444)


def _copy_across(work: Path, dest: Path, names: list[str]) -> None:
    """Another filesystem: copy to an incomplete-named directory, then rename."""
    tmp = dest.with_name(f".{dest.name}{INCOMPLETE}{os.getpid()}")
    try:
        tmp.mkdir(mode=0o700)
        for name in [*names, MANIFEST]:
            copy_sparse(work / name, tmp / name)
            os.chmod(tmp / name, 0o444)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
