"""A warm pool of pre-jailed VMMs: spawned, jailed, in their cgroups and netns, API ready.

Ids: a jail's id is fixed when the jailer runs, so a pooled VMM is spawned as
``pool-<12 hex>`` (its chroot and cgroups carry that name, and its network namespace if it
has a tap; one without is nameless, see :mod:`.netns.pool`). When it is
claimed as ``vm_id``, the registry gets a record under ``vm_id`` that names the pooled
jail's resources (``jail_dir``, ``cgroups``, ``netns_name``, ...), and only then is the
``pool-...`` record dropped. So ``vm_id`` is what ``ironclaw vm ls/stop`` and ``gc`` see;
host paths keep the pool name. A crash between the two steps leaves two records naming the
same resources, which ``gc`` removes once (every removal is idempotent).

A pool either boots (``snapshot=None``) or restores (``snapshot=``). Both do all they can
before a claim, so that a claim does as little as possible:

* boot: kernel and root drive are staged and the VMM is configured from the template at
  spawn (tap named after the pool id); the claim re-sends only guest settings it overrides,
  then ``InstanceStart``;
* restore: the snapshot's files are staged and loaded *paused* at spawn (guest memory is
  the shared, read-only page cache of the snapshot's memory file until the guest writes);
  the claim only resumes it.

Limits that differ from the template are written to the VM's cgroup files at claim; what is
fixed at spawn (uid/gid, jail, network namespace, tap, vsock) cannot be overridden.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from pathlib import Path
from typing import Any

from ..errors import ConfigError, IronclawError, UsageError
from ..registry import Registry, check_vm_id
from . import (
    KERNEL_JAIL_PATH,
    ROOTFS_JAIL_PATH,
    FirecrackerProcess,
    _configure,
    _own_ids,
    _recorder,
)
from . import cgroups as cg
from . import netns as ns
from .cancelsafe import finish
from .config import VmConfig
from .jailer import JailerProcess, JailFile, start_with_jailer
from .lifecycle import DEFAULT_READY_TIMEOUT_S
from .recording import VmRecorder, record_fields
from .restore import check_clone, clone_config, load_into, snapshot_files
from .snapshot import Snapshot
from .staging import stage_file

__all__ = ["POOL_ID_PREFIX", "WarmPool"]

log = logging.getLogger(__name__)

POOL_ID_PREFIX = "pool-"
#: Settings fixed when the VMM is spawned (claim refuses to change them).
_FIXED = (
    "enable_networking",
    "tap_host_cidr",
    "uplink_subnet",
    "vsock_guest_cid",
    "vsock_uds_path",
)
_FIXED_JAIL = (
    "uid",
    "gid",
    "chroot_base_dir",
    "exec_file",
    "jailer_binary",
    "netns",
    "isolate_network",
    "new_pid_ns",
    "api_sock",
    "cgroup_version",
    "parent_cgroup",
)
_MAX_TRIES = 3


class WarmPool:
    """Keeps ``size`` VMMs ready; :meth:`claim` hands one out, configured and running."""

    def __init__(
        self,
        template: VmConfig,
        size: int = 4,
        *,
        snapshot: Snapshot | None = None,
        registry: Registry | None = None,
        ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
    ) -> None:
        if size < 0:
            raise ConfigError(f"WarmPool size {size} must be >= 0")
        self.snapshot = snapshot
        self.template = clone_config(snapshot, "pool", template.jailer) if snapshot else template
        self.size = size
        self.registry = registry if registry is not None else Registry()
        self.ready_timeout_s = ready_timeout_s
        self._idle: list[FirecrackerProcess] = []
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._refiller: asyncio.Task[None] | None = None
        self._closed = False
        #: Why the last background spawn failed (``None`` once one succeeds).
        self.last_error: BaseException | None = None

    async def __aenter__(self) -> WarmPool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def ready(self) -> int:
        return len(self._idle)

    async def start(self, *, wait: bool = True) -> None:
        """Start the background refill; with ``wait`` return once the pool is full."""
        if self._closed:
            raise UsageError("this WarmPool was closed")
        if self._refiller is None:
            self._refiller = asyncio.create_task(self._refill_loop())
        if wait:
            while len(self._idle) < self.size:
                if self.last_error is not None:
                    raise self.last_error
                await asyncio.sleep(0.005)

    # ------------------------------------------------------------------ spawning

    def _pool_config(self) -> VmConfig:
        vm_id = POOL_ID_PREFIX + secrets.token_hex(6)
        base = self.template.jailer
        if base is not None and "jailer_id" in base.model_fields_set:
            raise ConfigError(
                "WarmPool template: leave jailer.jailer_id unset (pool ids are made up)"
            )
        return self.template.model_copy(update={"vm_id": vm_id})

    async def _spawn(self) -> FirecrackerProcess:
        config = self._pool_config()
        jailer_cfg = config.jailer_config()
        if self.snapshot is not None:
            check_clone(self.snapshot, config, jailer_cfg)
            files = snapshot_files(self.snapshot, config)
            tap = self.snapshot.manifest.tap
        else:
            files = [JailFile(Path(config.kernel_path), KERNEL_JAIL_PATH, read_only=True)]
            if config.rootfs_path is not None:
                files.append(JailFile(Path(config.rootfs_path), ROOTFS_JAIL_PATH,
                                      read_only=config.rootfs_read_only, is_disk=True))  # fmt: skip
            tap = ns.tap_name(config.vm_id) if config.enable_networking else None
        recorder = _recorder(config, jailer_cfg, self.registry, True, True, jailed=True)
        assert recorder is not None
        try:
            jailer_cfg = _own_ids(config, jailer_cfg, recorder)
            vmm = await start_with_jailer(
                jailer_cfg, files=files, tap=tap,
                tap_host_cidr=config.tap_host_cidr if tap else None,
                ready_timeout_s=self.ready_timeout_s, on_change=recorder.on_change,
                console_limit_bytes=config.console_limit_bytes,
            )  # fmt: skip
        except BaseException:
            recorder.abandoned()
            raise
        vm = FirecrackerProcess(config, vmm, recorder=recorder)
        try:
            if self.snapshot is not None:
                # The template says whether claimed VMs track dirty pages (Diff snapshots).
                await load_into(
                    vmm, self.snapshot, resume=False,
                    track_dirty_pages=self.template.track_dirty_pages,
                )  # fmt: skip
            else:
                await _configure(vm)
            recorder.started(vm)
        except BaseException:
            await finish(vm.stop(timeout_s=0))  # completes even if cancelled (again)
            raise
        return vm

    async def _refill_loop(self) -> None:
        """Spawn one VMM at a time until the pool is full; sleep until a claim wakes it.

        Never cancelled mid-spawn: :meth:`close` sets ``_closed`` and waits, so a VMM being
        spawned is always either put in the pool or stopped, never left running.
        """
        while not self._closed:
            if len(self._idle) >= self.size:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                vm = await self._spawn()
            except Exception as exc:
                self.last_error = exc
                log.error("warm pool: spawning a VMM failed: %s", exc)
                with contextlib.suppress(TimeoutError):  # do not spin on a broken host
                    async with asyncio.timeout(1.0):
                        await self._closing.wait()
                continue
            self.last_error = None
            if self._closed:
                await vm.stop(timeout_s=0)
            else:
                self._idle.append(vm)

    # ------------------------------------------------------------------ claiming

    def _claimed_config(self, vm_id: str, overrides: dict[str, Any]) -> VmConfig:
        check_vm_id(vm_id)
        if self.snapshot is not None:
            guest = set(overrides) - {"jailer", "require_sandbox", "memory_headroom_mb"}
            if guest:
                raise ConfigError(
                    f"WarmPool.claim({vm_id}): {sorted(guest)} are fixed by the pool's snapshot"
                )
        if (
            "rootfs_path" in overrides
            and overrides["rootfs_path"] is None
            and (self.template.rootfs_path is not None)
        ):
            raise ConfigError(
                f"WarmPool.claim({vm_id}): the pool's VMMs have a root drive configured; "
                "Firecracker cannot remove it before boot: use a pool without rootfs_path"
            )
        for key in _FIXED:
            if key in overrides and overrides[key] != getattr(self.template, key):
                raise ConfigError(
                    f"WarmPool.claim({vm_id}): {key} is fixed when the pool spawns its VMMs"
                )
        data = self.template.model_dump(exclude={"vm_id", "jailer"}, exclude_unset=True)
        data.update(overrides)
        jailer = overrides.get("jailer", self.template.jailer)
        if jailer is not None and not isinstance(jailer, dict):
            jailer = jailer.model_dump(exclude_unset=True)
        tmpl_jail = self.template.jailer_config()
        for key in _FIXED_JAIL:
            if jailer and key in jailer and jailer[key] != getattr(tmpl_jail, key):
                raise ConfigError(
                    f"WarmPool.claim({vm_id}): jailer.{key} is fixed when the pool spawns its VMMs"
                )
        data["jailer"] = jailer
        return VmConfig(vm_id=vm_id, **data)

    async def claim(self, vm_id: str, **overrides: Any) -> FirecrackerProcess:
        """Hand out a pooled VMM as ``vm_id``: configured and started (or restored), running.

        ``overrides`` are ``VmConfig`` fields (e.g. ``boot_args``, ``memory_mb``, ``jailer=``
        with other limits). If no VMM is ready one is spawned on the spot.
        """
        if self._closed:
            raise UsageError("this WarmPool was closed")
        config = self._claimed_config(vm_id, overrides)
        # Files named by the claim are checked before anything is taken or written.
        if self.snapshot is None:
            from .staging import check_source

            check_source(Path(config.kernel_path), "kernel_path")
            if config.rootfs_path is not None:
                check_source(Path(config.rootfs_path), "rootfs_path")
        recorder = VmRecorder(self.registry, vm_id, owns_claim=True)
        try:
            for attempt in range(_MAX_TRIES):
                pooled = await self._take()
                vm = FirecrackerProcess(config, pooled.vmm, recorder=recorder)
                try:
                    # One write: the claimed id's record, naming the pooled jail's resources.
                    fields = record_fields(vm)  # vcpus, memory, uid/gid, jail, cgroups, ...
                    self.registry.claim(vm_id, config=config.model_dump(mode="json"), **fields)
                except BaseException:
                    self._idle.insert(0, pooled)  # untouched: back into the pool
                    raise
                try:
                    await self._hand_over(vm, pooled)
                    return vm
                except BaseException as exc:
                    died = not pooled.vmm.process.alive
                    # Also drops the claimed record; completes even if cancelled (again).
                    await finish(vm.stop(timeout_s=0.5))
                    if not isinstance(exc, IronclawError) or not died or attempt == _MAX_TRIES - 1:
                        raise
                    log.warning(
                        "warm pool: VMM %s died during its claim; taking another", pooled.vm_id
                    )
            raise AssertionError("unreachable")
        finally:
            self._wake.set()

    async def _take(self) -> FirecrackerProcess:
        """An idle VMM whose process still runs; dead ones are cleaned up on the way."""
        while self._idle:
            vm = self._idle.pop(0)
            if vm.vmm.process.alive:
                return vm
            log.warning("warm pool: VMM %s died while waiting; removing it", vm.vm_id)
            with contextlib.suppress(IronclawError):
                await finish(vm.stop())
        self._wake.set()
        return await self._spawn()

    async def _hand_over(self, vm: FirecrackerProcess, pooled: FirecrackerProcess) -> None:
        vmm = vm.vmm
        assert isinstance(vmm, JailerProcess)
        # The claimed id's record names the pooled jail now: the pool's record goes.
        self.registry.release(pooled.vm_id)
        await finish(asyncio.to_thread(self._apply_limits, vm, vmm))
        if self.snapshot is not None:
            await vmm.api.resume()
            vm.last_snapshot = self.snapshot
            return
        await self._reconfigure(vm, pooled, vmm)
        await vm.start_instance()

    @staticmethod
    async def _reconfigure(
        vm: FirecrackerProcess, pooled: FirecrackerProcess, vmm: JailerProcess
    ) -> None:
        """Re-send the guest settings the claim changed (allowed until InstanceStart)."""
        cfg, old, jcfg, api = vm.config, pooled.config, vmm.config, vmm.api
        if (cfg.vcpu_count, cfg.memory_mb, cfg.track_dirty_pages) != (
            old.vcpu_count,
            old.memory_mb,
            old.track_dirty_pages,
        ):
            await api.put_machine_config(
                cfg.vcpu_count, cfg.memory_mb, track_dirty_pages=cfg.track_dirty_pages
            )
        if cfg.kernel_path != old.kernel_path:
            await finish(asyncio.to_thread(
                stage_file, Path(cfg.kernel_path), jcfg.chroot_dir, KERNEL_JAIL_PATH,
                uid=jcfg.uid, gid=jcfg.gid, read_only=True,
            ))  # fmt: skip
        if cfg.kernel_path != old.kernel_path or cfg.kernel_cmdline() != old.kernel_cmdline():
            boot_args = cfg.kernel_cmdline()
            await api.put_boot_source(KERNEL_JAIL_PATH, boot_args)
        if cfg.rootfs_path is not None and (
            cfg.rootfs_path != old.rootfs_path or cfg.rootfs_read_only != old.rootfs_read_only
        ):
            await finish(asyncio.to_thread(
                stage_file, Path(cfg.rootfs_path), jcfg.chroot_dir, ROOTFS_JAIL_PATH,
                uid=jcfg.uid, gid=jcfg.gid, read_only=cfg.rootfs_read_only,
            ))  # fmt: skip
            await api.put_drive(
                "rootfs", ROOTFS_JAIL_PATH, root=True, read_only=cfg.rootfs_read_only
            )

    @staticmethod
    def _apply_limits(vm: FirecrackerProcess, vmm: JailerProcess) -> None:
        """Write the claimed config's cgroup values that differ from the spawned ones."""
        cgroups = vmm.resources.cgroups
        if cgroups is None:
            return
        wanted = vm.config.jailer_config().model_copy(update={"jailer_id": vmm.config.jailer_id})
        new = cg.cgroup_settings(wanted, cgroups.version, None)
        old = {(s.controller, s.file): s.value for s in cgroups.settings}
        for s in new:
            if old.get((s.controller, s.file)) == s.value:
                continue
            if s.controller not in cgroups.controllers and cgroups.version == 1:
                raise ConfigError(
                    f"VM {vm.vm_id}: limit {s.file}={s.value} needs the {s.controller} cgroup, "
                    "which the pooled VMM was spawned without: set that limit in the pool's "
                    "template"
                )
            cgroups._write_setting(s)  # same writer (and error messages) as at spawn
        cgroups.settings = list(new)
        vmm.config = vmm.config.model_copy(
            update={k: getattr(wanted, k) for k in type(wanted).model_fields if k not in _FIXED_JAIL
                    and k != "jailer_id"}
        )  # fmt: skip

    async def close(self) -> None:
        """Stop the refill and every idle VMM (claimed VMs are the claimer's to stop).

        Runs to its end even if cancelled meanwhile (then re-raises the cancellation).
        """
        await finish(self._close())

    async def _close(self) -> None:
        self._closed = True
        self._closing.set()
        self._wake.set()
        if self._refiller is not None:
            await self._refiller  # finishes (or stops) a spawn in progress, then returns
            self._refiller = None
        idle, self._idle = self._idle, []
        results = await asyncio.gather(
            *(vm.stop(timeout_s=0.5) for vm in idle), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
