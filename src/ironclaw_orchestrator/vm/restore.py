"""Restoring a snapshot into a fresh jail (and so forking a VM: N restores of one snapshot).

Each restore is a new VMM started by the same path as any jailed VM (``start_with_jailer``:
its own chroot, uid/gid from the registry, cgroups, network namespace, recorded before each
resource exists), with the snapshot's files staged in instead of a kernel:

* ``memory`` and ``vmstate`` are hard-linked read-only (0444, root-owned) when the snapshot
  lives on the jail's filesystem, else copied. Firecracker maps guest memory ``MAP_PRIVATE``
  from that file, so clones share its page cache and none can write it. They go in the
  jail's root (``/memory``, ``/vmstate``): a directory for them would cost every restore a
  directory creation and removal (~0.13 ms of CPU on ext4 here) for nothing;
* the root drive gets a writable copy of its own per clone, at the jail path the VM state
  names (``/rootfs.ext4``);
* the tap the state names is created in the clone's own network namespace (so every clone
  has the same tap name without clashing); the vsock socket is recreated by Firecracker at
  its jail path inside the clone's own chroot.

Then ``PUT /snapshot/load`` (body by version) and, unless ``resume=False``, the VM runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path, PurePosixPath

from ..errors import ConfigError
from ..registry import Registry
from . import FirecrackerProcess, _own_ids, _recorder
from .cancelsafe import finish
from .config import JailerConfig, VmConfig, check_id
from .hostcheck import check_socket_budget
from .jailer import JailerProcess, JailFile, resolve_binaries, start_with_jailer
from .lifecycle import DEFAULT_READY_TIMEOUT_S
from .snapshot_api import load_body
from .snapshot_dir import CLONE_MEMORY, CLONE_STATE, Snapshot

__all__ = [
    "CLONE_MEMORY",
    "CLONE_STATE",
    "check_clone",
    "clone_config",
    "load_into",
    "restore_snapshot",
    "snapshot_files",
]

log = logging.getLogger(__name__)


def clone_config(snap: Snapshot, vm_id: str, jailer: JailerConfig | None = None) -> VmConfig:
    """The source VM's config under ``vm_id``; ``jailer`` replaces its jail settings/limits.

    Guest-visible settings (memory, vCPUs, devices) are fixed by the snapshot. Without
    ``jailer``, the config is validated once per snapshot and each clone gets a copy with its
    own id (no validator but the id rule depends on the id).
    """
    if jailer is not None:
        return _clone_config(snap.source_config(), vm_id, jailer)
    try:
        check_id(vm_id)
    except ValueError:
        return _clone_config(snap.source_config(), vm_id, None)  # raises the usual ConfigError
    template = snap.derived.get("clone")
    if template is None:
        src = snap.source_config()
        template = snap.derived["clone"] = _clone_config(src, src.vm_id, None)
    assert isinstance(template, VmConfig)
    # A copy of the template: clones never share a (mutable) jail config with it.
    jail = template.jailer.model_copy() if template.jailer is not None else None
    return template.model_copy(update={"vm_id": vm_id, "jailer": jail})


def _clone_config(src: VmConfig, vm_id: str, jailer: JailerConfig | None) -> VmConfig:
    base = jailer if jailer is not None else src.jailer
    if base is not None and "jailer_id" in base.model_fields_set and jailer is None:
        # The source's explicit jail id names the source's jail, never a clone's.
        base = JailerConfig(**base.model_dump(exclude={"jailer_id"}, exclude_unset=True))
    data = src.model_dump(exclude={"vm_id", "jailer"}, exclude_unset=True)
    return VmConfig(vm_id=vm_id, jailer=base, **data)


def snapshot_files(snap: Snapshot, config: VmConfig) -> list[JailFile]:
    """What to stage into a clone's jail for ``snap``."""
    files = [
        JailFile(snap.memory_path, CLONE_MEMORY, read_only=True),
        JailFile(snap.state_path, CLONE_STATE, read_only=True),
    ]
    rootfs = snap.rootfs_path
    if rootfs is not None and snap.manifest.rootfs_jail_path is not None:
        files.append(
            JailFile(
                rootfs,
                PurePosixPath(snap.manifest.rootfs_jail_path),
                read_only=config.rootfs_read_only,
                is_disk=True,
            )
        )
    return files


def check_clone(snap: Snapshot, config: VmConfig, jailer_cfg: JailerConfig) -> None:
    """Checks that write nothing: snapshot unchanged, version, socket budget."""
    snap.check_unchanged()
    binaries = resolve_binaries(jailer_cfg)
    snap.check_version(binaries.version)
    if snap.manifest.tap is not None and (
        jailer_cfg.netns is not None or not jailer_cfg.isolate_network
    ):
        raise ConfigError(
            f"VM {config.vm_id}: the snapshot has a network interface on tap "
            f"{snap.manifest.tap}, which a clone recreates in a network namespace of its own: "
            "leave jailer.netns unset and isolate_network=True"
        )
    if snap.manifest.vsock_uds_path is not None:
        # Laid out as the jailer will: under the resolved exec file's name.
        jail = jailer_cfg.model_copy(update={"exec_file": binaries.firecracker})
        host = jail.chroot_dir / snap.manifest.vsock_uds_path.lstrip("/")
        check_socket_budget(Path(f"{host}_4294967295"), "vsock socket (with _<port>)")
    _warn_if_copied(snap, jailer_cfg)


_warned: set[tuple[int, int]] = set()


def _warn_if_copied(snap: Snapshot, jailer_cfg: JailerConfig) -> None:
    """Once per snapshot and chroot base: clones on another filesystem copy guest memory."""
    try:
        snap_dev = snap.memory_path.stat().st_dev
        jail_dev = jailer_cfg.chroot_base_dir.stat().st_dev
    except OSError:
        return  # reported by the start itself
    if snap_dev != jail_dev and (snap_dev, jail_dev) not in _warned:
        _warned.add((snap_dev, jail_dev))
        log.warning(
            "snapshot %s is on another filesystem than the chroot base %s: every clone gets a "
            "private copy of its %d MiB memory file instead of a shared read-only hard link; "
            "keep snapshots on the jail filesystem",
            snap.path, jailer_cfg.chroot_base_dir, snap.manifest.mem_size_mib,
        )  # fmt: skip


async def restore_snapshot(
    snap: Snapshot | Path | str,
    vm_id: str,
    *,
    resume: bool = True,
    jailer: JailerConfig | None = None,
    registry: Registry | None = None,
    claim: bool = True,
    record: bool | None = None,
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
    track_dirty_pages: bool | None = None,
) -> FirecrackerProcess:
    """Start a new VMM in a fresh jail as ``vm_id`` and load ``snap`` into it.

    ``snap`` is a :class:`Snapshot` (verified by :meth:`Snapshot.load`; only re-checked for
    changes here) or a directory to load and verify first. ``jailer`` sets the clone's jail
    and limits (default: the source VM's, with a uid/gid of the clone's own from the
    registry). The returned VM runs (or is paused with ``resume=False``) and is recorded in
    the registry like any other, so ``stop()`` and ``ironclaw gc`` clean it up;
    ``claim=False`` says the caller claimed ``vm_id`` there already (as a supervisor does).
    ``track_dirty_pages`` (default: as the snapshot's VM) lets the clone take Diff
    snapshots (``vm.snapshot(dir, diff=True)``) built on ``snap``.
    """
    if not isinstance(snap, Snapshot):
        snap = Snapshot.load(snap)
    config = clone_config(snap, vm_id, jailer)
    if track_dirty_pages is not None and track_dirty_pages != config.track_dirty_pages:
        config = config.model_copy(update={"track_dirty_pages": track_dirty_pages})
    jailer_cfg = config.jailer_config()
    check_clone(snap, config, jailer_cfg)
    recorder = _recorder(config, jailer_cfg, registry, claim, record, jailed=True)
    try:
        if recorder is not None:
            jailer_cfg = _own_ids(config, jailer_cfg, recorder)
        vmm = await start_with_jailer(
            jailer_cfg,
            files=snapshot_files(snap, config),
            tap=snap.manifest.tap,
            tap_host_cidr=config.tap_host_cidr if snap.manifest.tap else None,
            uplink_subnet=config.uplink_subnet,
            ready_timeout_s=ready_timeout_s,
            on_change=recorder.on_change if recorder is not None else None,
            console_limit_bytes=config.console_limit_bytes,
        )
    except BaseException:
        if recorder is not None:
            recorder.abandoned()
        raise
    vm = FirecrackerProcess(config, vmm, recorder=recorder)
    loading = asyncio.ensure_future(
        load_into(vmm, snap, resume=resume, track_dirty_pages=config.track_dirty_pages)
    )
    try:
        if recorder is not None:
            # Recorded while Firecracker maps the snapshot, not after: one turn of the loop
            # puts the request on the wire, and the record (VMM, jail, ids) holds either
            # way; a failed load stops the VM, which drops the record.
            await asyncio.sleep(0)
            recorder.started(vm)
        await loading
    except BaseException:
        loading.cancel()
        await finish(_stop_after(loading, vm))  # completes even if cancelled (again)
        raise
    vm.last_snapshot = snap
    vm.paused = not resume
    return vm


async def _stop_after(loading: asyncio.Future[None], vm: FirecrackerProcess) -> None:
    """Stop ``vm`` once its load request is over (answered, failed or cancelled)."""
    with contextlib.suppress(BaseException):
        await loading
    await vm.stop()


async def load_into(
    vmm: JailerProcess, snap: Snapshot, *, resume: bool, track_dirty_pages: bool | None = None
) -> None:
    """``PUT /snapshot/load`` of the files staged at their jail paths.

    ``track_dirty_pages`` (default: as the snapshot's VM did) lets the clone take Diff
    snapshots on top of ``snap``.
    """
    if track_dirty_pages is None:
        track_dirty_pages = bool(snap.manifest.config.get("track_dirty_pages", False))
    body = load_body(
        vmm.binaries.version,
        CLONE_STATE,
        CLONE_MEMORY,
        resume=resume,
        track_dirty_pages=track_dirty_pages,
    )
    await vmm.api.load_snapshot(body)
    # The guest is live: a stop sends Ctrl-Alt-Del first, as for a booted VM.
    vmm.booted = True
