"""Start and stop microVMs (spec: Basic Example, Graceful Degradation).

``start_firecracker(VmConfig)`` jails the VMM when the jailer can run here (production mode)
and otherwise, unless a sandbox is required, logs a WARNING and runs firecracker directly
(development mode). Either way the VM comes back configured over the API (machine config,
boot source, root drive, network, vsock): the caller only starts the instance.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ..errors import (
    ConfigError,
    JailerNotFoundError,
    SandboxRequiredError,
)
from ..registry import Registry
from . import api_calls
from . import netns as ns
from .cancelsafe import finish
from .config import JailerConfig, VmConfig
from .context import Starting, awaitable_context
from .handle import FirecrackerProcess
from .hardening import (
    NET_IFACE_ID,
    ROOTFS_DRIVE_ID,
    VmStats,
    check_confinement,
)
from .hostcheck import is_root
from .inputs import check_vm_inputs
from .jailer import (
    JailerProcess,
    JailFile,
    JailResources,
    resolve_binaries,
    start_with_jailer,
)
from .lifecycle import DEFAULT_READY_TIMEOUT_S, DEFAULT_STOP_TIMEOUT_S
from .ratelimit import RateLimit, TokenBucket, VsockRateLimit
from .recording import VmRecorder
from .seccomp import SECCOMP_FILTER_JAIL_PATH
from .unjailed import UnjailedProcess, start_unjailed

__all__ = [
    "FirecrackerProcess",
    "JailerConfig",
    "JailerProcess",
    "RateLimit",
    "Snapshot",
    "Starting",
    "TokenBucket",
    "VmConfig",
    "VmStats",
    "VsockRateLimit",
    "WarmPool",
    "restore_snapshot",
    "start_firecracker",
    "start_with_jailer",
    "stop_firecracker",
]

log = logging.getLogger(__name__)

KERNEL_JAIL_PATH = PurePosixPath("/vmlinux")
ROOTFS_JAIL_PATH = PurePosixPath("/rootfs.ext4")
INSTALL_JAILER_HINT = (
    "install the jailer (`ironclaw install`, or copy release-vX-<arch>/jailer to "
    "/usr/local/bin/jailer, chmod +x) and run as root"
)


@awaitable_context
async def start_firecracker(
    config: VmConfig,
    *,
    use_jailer: bool | None = None,
    registry: Registry | None = None,
    claim: bool = True,
    record: bool | None = None,
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
) -> FirecrackerProcess:
    """Start a microVM for ``config``; return it configured, not yet booted.

    Returns a :class:`Starting`: ``vm = await start_firecracker(cfg)`` (then
    ``await vm.stop()``), or ``async with start_firecracker(cfg) as vm:`` to have the VM
    stopped and cleaned up when the block ends, however it ends.

    ``use_jailer=None`` jails it whenever the jailer can run here and otherwise falls back to
    development mode with a WARNING (unless a sandbox is required); ``False`` asks for
    development mode on purpose (refused when a sandbox is required).

    The VM is recorded in ``registry`` (default: the host's, see :class:`Registry`) before any
    host resource is made, each resource as it is made, so ``ironclaw gc`` can clean up after
    a crash; ``record=None`` records when a registry is given or we run as root. The id is
    claimed there first (``RegistryError`` if in use) unless ``claim=False`` says the caller
    claimed it already. A recorded, jailed VM gets a uid/gid of its own from the registry
    unless ``jailer.uid``/``gid`` are set.
    """
    jailer_cfg = config.jailer_config()
    # With exec_file found and the jail paths derived: the start reuses them.
    jailer_cfg = check_vm_inputs(config, jailed=use_jailer is not False, jailer=jailer_cfg)
    reason = _unjailed_reason(config, jailer_cfg, use_jailer)
    check_confinement(config, jailer_cfg, jailed=reason is None)
    if reason is None:
        ns.netns_pool.size  # noqa: B018  (IRONCLAW_NETNS_POOL checked before the record)
    recorder = _recorder(config, jailer_cfg, registry, claim, record, jailed=reason is None)
    vmm: JailerProcess | UnjailedProcess
    try:
        if reason is None:
            if recorder is not None:
                jailer_cfg = _own_ids(config, jailer_cfg, recorder)
            vmm = await _start_jailed(
                config,
                jailer_cfg,
                ready_timeout_s,
                on_change=recorder.on_change if recorder is not None else None,
            )
        else:
            vmm = await start_unjailed(config, ready_timeout_s=ready_timeout_s)
    except BaseException:
        if recorder is not None:
            recorder.abandoned()
        raise
    vm = FirecrackerProcess(config, vmm, recorder=recorder)
    try:
        if reason is not None:  # a jailed start was configured with its readiness check
            await _configure(vm)
        if recorder is not None:
            recorder.started(vm)
    except BaseException:
        await finish(vm.stop())  # completes even if cancelled (again); then re-raised
        raise
    return vm


def _unjailed_reason(
    config: VmConfig, jailer_cfg: JailerConfig, use_jailer: bool | None
) -> str | None:
    """``None`` to jail the VM; else why it runs unjailed (after refusing what must not)."""
    if use_jailer is False:
        reason: str | None = "the jailer was turned off on request (use_jailer=False)"
    else:
        reason = _why_unjailed(jailer_cfg)
    if reason is None:
        return None
    if use_jailer is False and config.sandbox_required():
        raise ConfigError(
            f"VM {config.vm_id}: use_jailer=False (--no-jailer) contradicts the sandbox "
            "requirement (require_sandbox / IRONCLAW_REQUIRE_SANDBOX=1): drop one of them"
        )
    if config.sandbox_required() or use_jailer:
        raise SandboxRequiredError(
            f"VM {config.vm_id}: a sandbox is required (require_sandbox / "
            f"IRONCLAW_REQUIRE_SANDBOX=1 / use_jailer=True) but the VM cannot be jailed: "
            f"{reason}. Fix: {INSTALL_JAILER_HINT}"
        )
    if config.enable_networking:
        raise ConfigError(
            f"VM {config.vm_id}: enable_networking needs the jailer (the tap lives in the VM's "
            f"own network namespace), but {reason}: {INSTALL_JAILER_HINT}"
        )
    log.warning(
        "VM %s runs UNSANDBOXED (development mode, insecure: no chroot, no cgroup limits, "
        "no privilege drop): %s.%s",
        config.vm_id,
        reason,
        "" if use_jailer is False else f" Fix: {INSTALL_JAILER_HINT}",
    )
    return reason


def _recorder(
    config: VmConfig,
    jailer_cfg: JailerConfig,
    registry: Registry | None,
    claim: bool,
    record: bool | None,
    *,
    jailed: bool,
) -> VmRecorder | None:
    if record is None:
        record = registry is not None or is_root()
    if not record:
        return None
    registry = registry if registry is not None else Registry()
    if not claim:
        return VmRecorder(registry, config.vm_id, owns_claim=False)
    # One write: the claim, with the VM's own uid/gid (or the ones the caller chose).
    fields: dict[str, object] = {}
    chosen = _chosen_ids(config)
    if jailed and chosen:
        fields.update(uid=jailer_cfg.uid, gid=jailer_cfg.gid)
    claimed = registry.claim(
        config.vm_id,
        allocate_ids=jailed and not chosen,
        config=config.model_dump(mode="json"),
        vcpus=config.vcpu_count,
        memory_mb=config.memory_mb,
        **fields,
    )
    return VmRecorder(registry, config.vm_id, owns_claim=True, record=claimed)


def _chosen_ids(config: VmConfig) -> bool:
    chosen = config.jailer.model_fields_set if config.jailer is not None else set()
    return bool({"uid", "gid"} & chosen)


def _own_ids(config: VmConfig, jailer_cfg: JailerConfig, recorder: VmRecorder) -> JailerConfig:
    """A uid/gid of the VM's own from the registry, unless the caller chose them."""
    claimed = recorder.record
    if claimed is not None and claimed.uid is not None and claimed.gid is not None:
        return jailer_cfg.model_copy(update={"uid": claimed.uid, "gid": claimed.gid})
    registry = recorder.registry
    if _chosen_ids(config):
        registry.update(config.vm_id, uid=jailer_cfg.uid, gid=jailer_cfg.gid)
        return jailer_cfg
    uid, gid = registry.allocate_ids(config.vm_id)
    return jailer_cfg.model_copy(update={"uid": uid, "gid": gid})


async def stop_firecracker(
    vm: FirecrackerProcess, timeout_s: float = DEFAULT_STOP_TIMEOUT_S
) -> None:
    """Stop ``vm`` (graceful, then SIGKILL), reap it and remove all it used. Idempotent."""
    await vm.stop(timeout_s)


def _why_unjailed(jailer_cfg: JailerConfig) -> str | None:
    """Why the VM cannot be jailed (fallback reasons only); ``None`` if it can be."""
    if not is_root():
        return f"not running as root (uid {os.geteuid()}), which the jailer requires"
    try:
        resolve_binaries(jailer_cfg)
    except JailerNotFoundError as exc:
        return str(exc)
    return None


async def _start_jailed(
    config: VmConfig,
    jailer_cfg: JailerConfig,
    ready_timeout_s: float,
    on_change: Callable[[JailResources], None] | None,
) -> JailerProcess:
    # check_vm_inputs (kernel, rootfs) and check_confinement (seccomp filter) checked them.
    files = [JailFile(Path(config.kernel_path), KERNEL_JAIL_PATH, read_only=True, checked=True)]
    if config.rootfs_path is not None:
        files.append(
            JailFile(
                Path(config.rootfs_path),
                ROOTFS_JAIL_PATH,
                read_only=config.rootfs_read_only,
                is_disk=True,
                checked=True,
            )
        )
    if jailer_cfg.seccomp_filter is not None:
        files.append(JailFile(jailer_cfg.seccomp_filter, SECCOMP_FILTER_JAIL_PATH, checked=True))
    # The vsock socket's budget was checked by check_vm_inputs, with the jail laid out under
    # the resolved exec file's name (jailer_cfg is its copy, with that name).
    tap = ns.tap_name(config.vm_id) if config.enable_networking else None
    return await start_with_jailer(
        jailer_cfg,
        files=files,
        tap=tap,
        tap_host_cidr=config.tap_host_cidr if tap else None,
        uplink_subnet=config.uplink_subnet,
        ready_timeout_s=ready_timeout_s,
        on_change=on_change,
        console_limit_bytes=config.console_limit_bytes,
        preboot=_preboot_calls(config, jailed=True),
    )


async def _configure(vm: FirecrackerProcess) -> None:
    """Pre-configure the VM over the API from its ``VmConfig`` (a jailed start sends the same
    requests with its readiness check instead, see :func:`start_with_jailer`)."""
    await vm.api.request_all(_preboot_calls(vm.config, jailed=isinstance(vm.vmm, JailerProcess)))


def _preboot_calls(cfg: VmConfig, *, jailed: bool) -> list[api_calls.Call]:
    """The requests that pre-configure a VM from its ``VmConfig``: sent pipelined, one write
    and one wake-up for all the answers (each wake-up of the event loop costs ~0.1 ms CPU
    on a virtualised host)."""
    if cfg.vsock_guest_cid is not None and not jailed:
        raise ConfigError(f"VM {cfg.vm_id}: vsock is only supported for jailed VMs")
    kernel = KERNEL_JAIL_PATH if jailed else Path(cfg.kernel_path)
    requests = [
        api_calls.machine_config(
            cfg.vcpu_count, cfg.memory_mb, track_dirty_pages=cfg.track_dirty_pages
        ),
        api_calls.boot_source(kernel, cfg.kernel_cmdline()),
    ]
    if cfg.rootfs_path is not None:
        rootfs = ROOTFS_JAIL_PATH if jailed else Path(cfg.rootfs_path)
        requests.append(api_calls.drive(
            ROOTFS_DRIVE_ID, rootfs, root=True, read_only=cfg.rootfs_read_only,
            rate_limit=cfg.drive_rate_limit,
        ))  # fmt: skip
    if cfg.enable_networking:
        requests.append(api_calls.network_interface(
            NET_IFACE_ID, ns.tap_name(cfg.vm_id), ns.guest_mac(cfg.vm_id),
            rx_rate_limit=cfg.net_rx_rate_limit, tx_rate_limit=cfg.net_tx_rate_limit,
        ))  # fmt: skip
    if cfg.vsock_guest_cid is not None:
        requests.append(api_calls.vsock(cfg.vsock_guest_cid, cfg.vsock_uds_path))
    return requests


if TYPE_CHECKING:
    from .pool import WarmPool
    from .restore import restore_snapshot
    from .snapshot import Snapshot

#: Names whose modules load on first use (a plain start never needs the snapshot code).
_LAZY = {"Snapshot": ".snapshot", "WarmPool": ".pool", "restore_snapshot": ".restore"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
