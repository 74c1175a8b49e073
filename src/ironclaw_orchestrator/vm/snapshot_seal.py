"""Sealing a snapshot: files made read-only and root's, hashed, the manifest written last,
the directory moved into place (across filesystems through an incomplete-named copy)."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import StagingError
from .binaries import Version
from .config import VmConfig
from .snapshot_cache import fingerprint
from .snapshot_dir import (
    _VERIFIED,
    FORMAT,
    INCOMPLETE,
    MANIFEST,
    MEMORY,
    ROOTFS,
    VMSTATE,
    BaseRef,
    FileEntry,
    Progress,
    Snapshot,
    SnapshotManifest,
    sha256_file,
)
from .staging import copy_extents

__all__ = ["copy_sparse", "seal_snapshot"]

_FICLONE = 0x40049409


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
    _VERIFIED.put(dest, (manifest, snap.derived), prints, started_ns=started_ns, exempt={MANIFEST})
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
