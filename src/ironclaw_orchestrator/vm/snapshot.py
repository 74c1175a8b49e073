"""Snapshots of a running microVM: taking them (here), verifying them before anyone uses one
(:mod:`.snapshot_dir`), sealing them (:mod:`.snapshot_seal`). Every public name of those
modules is importable from here too.

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
import logging
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from ..errors import ConfigError, UsageError
from .api import FirecrackerApi
from .binaries import Version
from .cancelsafe import ThreadSteps, finish
from .config import VmConfig
from .jailer import JailerProcess
from .snapshot_api import create_body, diff_needs_tracking
from .snapshot_base import check_handle_base, forget_base, remember_base
from .snapshot_diff import check_reports_holes, merge_layer
from .snapshot_dir import (
    FORMAT,
    INCOMPLETE,
    JAIL_SNAPSHOT_DIR,
    LAYER,
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
from .snapshot_seal import copy_sparse, seal_snapshot
from .staging import make_owned_dir

if TYPE_CHECKING:
    from . import FirecrackerProcess

log = logging.getLogger(__name__)

__all__ = [
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
    "SnapshotSource",
    "copy_sparse",
    "seal_snapshot",
    "sha256_file",
    "snapshot_vm",
    "take_snapshot",
]


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
    if base is not None:
        check_handle_base(vm.vm_id, vmm.config.jail_dir, base)
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
        # From here until the seal, no snapshot is a valid Diff base (see snapshot_base).
        forget_base(source.chroot_dir.parent)
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

        snap = await steps.run(seal)
        try:
            remember_base(source.chroot_dir.parent, snap)
        except OSError as exc:  # the snapshot is good; only `vm snapshot --diff` misses it
            log.warning("snapshot %s: could not note it as the Diff base: %s", dest, exc)
        return snap
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
