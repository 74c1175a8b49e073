"""Launching Firecracker inside the Jailer (spec: Direct Jailer Usage).

``start_with_jailer`` runs, in order, and undoes everything it made if any step fails:

1. checks that write nothing: root, binaries and their versions, /dev/kvm, chroot base,
   socket path length, input files, the cgroup plan;
2. the VM's run directory (console log), its network namespace, its cgroups (every limit is
   written by us first, so a value the kernel rejects is reported precisely), the chroot
   with the staged files;
3. the jailer itself; with ``--new-pid-ns`` it forks the VMM and exits, and the VMM is
   re-parented to us (we are its subreaper);
4. readiness: the API socket answers ``GET /``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .. import names
from ..errors import (
    ChrootBaseError,
    CleanupError,
    ConfigError,
    IronclawError,
    SandboxRequiredError,
)
from ..safefs import check_not_swappable, check_run_root
from . import cgroups as cg
from . import cleanup
from . import netns as ns
from .api import Call, FirecrackerApi
from .binaries import resolve_binaries
from .cancelsafe import ThreadSteps, finish
from .config import JailerConfig
from .consolelog import DEFAULT_CONSOLE_LIMIT_BYTES, ConsolePump
from .context import awaitable_context
from .hostcheck import check_chroot_base, check_kvm, check_socket_budget, is_root
from .jailer_args import CgroupArg, build_jailer_argv
from .jailer_process import JailerProcess
from .jailer_process import adopt_vmm as _adopt_vmm
from .lifecycle import (
    DEFAULT_READY_TIMEOUT_S,
    abort_start,
    wait_ready,
)
from .process import ChildProcess, become_subreaper
from .resources import JailResources
from .rundir import CONSOLE_LOG, create_vm_run_dir, run_root
from .staging import check_source, stage_file

__all__ = [
    "JailFile",
    "JailResources",
    "JailerConfig",
    "JailerProcess",
    "jailer_available",
    "resolve_binaries",
    "start_with_jailer",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JailFile:
    """A host file to place in the jail before the VMM starts."""

    src: Path
    jail_path: PurePosixPath
    read_only: bool = True
    #: A block device image (I/O limits apply to the disk that holds it).
    is_disk: bool = False
    #: ``check_source`` passed for this start already (``start_firecracker``'s input check,
    #: same image directories): not checked twice. Staging confines and opens it regardless.
    checked: bool = False


def jailer_available(config: JailerConfig | None = None) -> str | None:
    """``None`` if VMs can be jailed here, else the reason they cannot."""
    config = config or JailerConfig()
    if not is_root():
        return f"the jailer needs root (running as uid {os.geteuid()})"
    try:
        resolve_binaries(config)
    except IronclawError as exc:
        return str(exc)
    return None


@awaitable_context
async def start_with_jailer(
    config: JailerConfig,
    *,
    files: Sequence[JailFile] = (),
    tap: str | None = None,
    tap_host_cidr: str | None = None,
    uplink_subnet: str | None = None,
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
    log_level: str | None = None,
    on_change: Callable[[JailResources], None] | None = None,
    console_limit_bytes: int = DEFAULT_CONSOLE_LIMIT_BYTES,
    preboot: Sequence[Call] = (),
) -> JailerProcess:
    """Start Firecracker jailed by the jailer, per ``config``; return once its API answers.

    ``await`` it for the :class:`JailerProcess`, or ``async with start_with_jailer(...) as
    vmm:`` to have it stopped and cleaned up when the block ends (see :class:`Starting`).

    ``files`` are staged into the jail first (owned by the jail uid/gid). ``tap`` names a tap
    device to create in the VM's network namespace (addressed ``tap_host_cidr`` there);
    ``uplink_subnet`` opts in to a veth pair from that namespace to the host. Everything
    created is removed again if any step fails. ``on_change`` is called once, when the VM's
    run and jail directories are claimed (made exclusively, so known to be ours) and before
    its network namespace is made, so a crash-safe registry can record them first; the
    caller records the rest once the VM runs (see :mod:`.recording`). The VMM's output goes
    to ``console.log`` in the run directory, within ``console_limit_bytes`` (see
    :mod:`.consolelog`). ``preboot`` requests (the VM's configuration) go pipelined with the
    readiness check: the start returns configured, one wake-up of the event loop sooner.
    """
    # 1. Checks that write nothing.
    if not is_root():
        raise SandboxRequiredError(
            f"VM {config.jailer_id}: the jailer must run as root (uid {os.geteuid()}): run the "
            "orchestrator as root, or use start_firecracker() without require_sandbox for "
            "unjailed development mode"
        )
    binaries = resolve_binaries(config)
    config = config.with_exec_file(binaries.firecracker)  # as check_vm_inputs resolved it
    check_kvm()
    check_chroot_base(config.chroot_base_dir)
    check_not_swappable(config.chroot_base_dir, "chroot base", ChrootBaseError)
    if os.path.lexists(config.jail_dir.parent):
        check_not_swappable(config.jail_dir.parent, "jail directory parent", ChrootBaseError)
    check_run_root(run_root())
    check_socket_budget(config.api_socket_path)
    for f in files:
        if not f.checked:
            check_source(f.src, f"file for {f.jail_path}", config.image_dirs)
    if config.netns is not None and not Path(config.netns).exists():
        raise ConfigError(
            f"VM {config.jailer_id}: netns {config.netns} does not exist: create it "
            "(ip netns add NAME) or leave netns unset to get a private one"
        )
    if (tap is not None or uplink_subnet is not None) and (
        config.netns is not None or not config.isolate_network
    ):
        raise ConfigError(
            f"VM {config.jailer_id}: networking (tap / uplink) needs a network namespace of our "
            "own: leave netns unset and isolate_network=True"
        )
    nameless = _nameless_netns(config, tap, uplink_subnet)
    if nameless:
        ns.netns_pool.size  # noqa: B018  (IRONCLAW_NETNS_POOL checked before anything is made)
    taken = _netns_taken(config, named=not nameless)
    if taken is not None:
        raise ConfigError(
            f"VM {config.jailer_id}: network namespace {taken} already exists: the id is in "
            "use (perhaps by an orchestrator with another state directory), or a crash "
            "left it behind (`ironclaw gc` removes leftovers)"
        )
    if config.jail_dir.exists():
        raise ConfigError(
            f"VM {config.jailer_id}: jail directory {config.jail_dir} already exists: the id is "
            "in use, or a crashed run left it behind (`ironclaw gc` removes leftovers)"
        )
    disks = [f.src for f in files if f.is_disk]
    if _wants_io(config) and not disks:
        raise ConfigError(
            f"VM {config.jailer_id}: io_* limits throttle the VM's disks, but it has none: "
            "give it a rootfs or unset the io limits"
        )
    io_device = cg.disk_device_for(disks[0]) if disks and _wants_io(config) else None
    layout = cg.detect_layout()
    version = cg.choose_version(layout, config.cgroup_version, _controllers(config))
    settings = cg.cgroup_settings(config, version, io_device)
    cgroups = cg.VmCgroups.plan(layout, version, config.jailer_id, settings, config.parent_cgroup)
    # The jailer's move into its cgroups would wait an RCU grace period: let it pass now, in
    # a thread, while the VM is prepared (see cgroups.warmup).
    warming = cg.warm_migration_lock(layout, cgroups.fs)
    if config.new_pid_ns:
        become_subreaper()

    # 2..4: create, spawn, wait; undo on failure. Each resource is recorded (res.changed)
    # before it is made, and only once it is known to be ours: a resource that turns out to
    # exist already (the same id started elsewhere) is never recorded, so never removed.
    res = JailResources(vm_id=config.jailer_id, listener=on_change)
    process: ChildProcess | None = None
    api: FirecrackerApi | None = None
    pump: ConsolePump | None = None
    steps = ThreadSteps()
    try:
        # The run directory is created exclusively: it claims the id under this run root.
        res.run_dir = create_vm_run_dir(config.jailer_id)
        # The jail appears atomically with our marker: it claims the id under this base.
        res.jail_dir = cleanup.claim_jail_dir(config.jail_dir, config.jailer_id)
        res.tap = tap
        res.uplink = uplink_subnet is not None
        res.cgroups = cgroups
        console = res.run_dir / CONSOLE_LOG
        pump = ConsolePump(console, console_limit_bytes)
        if tap is None and uplink_subnet is None:
            # Short and bounded (an unshare, a bind mount, a few mkdirs): on the event loop.
            # On a loaded host a thread hop costs more than this work (the GIL changes hands
            # at each system call of the thread). The cgroups' locked path may wait for
            # another process: that one goes to a thread.
            netns = _make_namespace(res, config, None, None, None)
            if warming is not None and not warming.done():
                # Our pending move holds cgroup_mutex: the mkdirs wait for it in a thread.
                await steps.run(cgroups.prepare)
            elif not cgroups.prepare_lock_free():
                await steps.run(cgroups.prepare_locked)
        else:
            # One thread step (one hop off the event loop and back, not one per resource).
            netns = await steps.run(
                _make_host_side, res, cgroups, config, tap, tap_host_cidr, uplink_subnet
            )
        config.chroot_dir.mkdir(mode=0o755)
        for f in files:
            res.staged.append(
                stage_file(
                    f.src, config.chroot_dir, f.jail_path,
                    uid=config.uid, gid=config.gid, read_only=f.read_only,
                    image_dirs=config.image_dirs,
                )
            )  # fmt: skip
        argv = build_jailer_argv(
            config,
            jailer=binaries.jailer,
            exec_file=config.exec_file_resolved,  # the file the jail is named after
            version=binaries.version,
            cgroup_version=version,
            cgroups=[CgroupArg(s.file, s.value) for s in cgroups.jailer_settings()],
            parent_cgroup=cgroups.parent,
            netns=netns,
            level=log_level,
        )
        log.debug("VM %s: %s", config.jailer_id, " ".join(argv))
        res.vmm_unknown = config.new_pid_ns
        process = ChildProcess.spawn(argv, stdout_fd=pump.write_fd)
        cg.migration_coming()  # the jailer moves itself into its cgroups: the lock stays warm
        pump.child_started()
        pump.attach()
        if config.new_pid_ns:
            process = await _adopt_vmm(process, config, console)
        res.vmm_pid, res.vmm_start_time = process.pid, process.start_time
        res.vmm_unknown = False
        cgroups.attach(process.pid)
        api = FirecrackerApi(config.api_socket_path, vm_id=config.jailer_id)
        await wait_ready(
            process, api, config.api_socket_path,
            vm_id=config.jailer_id, console_path=console, timeout_s=ready_timeout_s,
            then=preboot,
        )  # fmt: skip
        res.close_netns_fd()  # the VMM answers from inside its namespace: joined
    except BaseException:
        # Runs to its end even if cancelled (again) meanwhile; then the error propagates.
        await finish(_roll_back(steps, process, api, res, pump))
        raise
    return JailerProcess(
        config=config,
        binaries=binaries,
        process=process,
        resources=res,
        console_path=console,
        api=api,
        argv=argv,
        console=pump,
    )


#: Kept for importers: the helper's home is :mod:`.cancelsafe`.
_ThreadSteps = ThreadSteps


async def _roll_back(
    steps: ThreadSteps, process: ChildProcess | None, api: FirecrackerApi | None,
    res: JailResources, pump: ConsolePump | None = None,
) -> None:  # fmt: skip
    """Undo a half-finished start: what a thread step made too, so it is waited for first."""
    await steps.settle()
    await abort_start(process, api)
    if pump is not None:
        pump.close()  # the VMM is reaped: take in its last words, close the terminal
    try:
        await asyncio.to_thread(res.release)
    except CleanupError as cleanup_exc:
        log.error("%s", cleanup_exc)


#: Kept for importers: the marker's one home is :mod:`ironclaw_orchestrator.names`.
JAIL_MARKER = names.JAIL_MARKER


def _nameless_netns(config: JailerConfig, tap: str | None, uplink_subnet: str | None) -> bool:
    """Whether the VM gets a namespace of its own with no name (see :mod:`.netns.pool`): not
    with a tap or uplink (they are set up by name), nor under an AppArmor profile or SELinux
    label, which would have to let the jailer read our process (opening ``/proc/<our
    pid>/fd/<fd>`` is a ptrace read of it; the generated AppArmor profile denies ptrace)."""
    return (
        config.netns is None
        and config.isolate_network
        and tap is None
        and uplink_subnet is None
        and config.apparmor_profile is None
        and config.selinux_label is None
    )


def _netns_taken(config: JailerConfig, named: bool) -> Path | None:
    """The VM's own namespace path if it will have a name (``named``) and it exists already
    (a quick check before making anything; :func:`cleanup.claim_netns` decides by an
    exclusive create)."""
    if config.netns is not None or not config.isolate_network or not named:
        return None
    path = ns.netns_path(names.netns_name(config.jailer_id))
    return path if os.path.lexists(path) else None


def _make_host_side(
    res: JailResources,
    cgroups: cg.VmCgroups,
    config: JailerConfig,
    tap: str | None,
    tap_host_cidr: str | None,
    uplink_subnet: str | None,
) -> str | None:
    """The VM's network namespace and then its cgroups, in one thread; returns the
    namespace path for the jailer."""
    netns = _make_namespace(res, config, tap, tap_host_cidr, uplink_subnet)
    cgroups.prepare()
    return netns


def _make_namespace(
    res: JailResources,
    config: JailerConfig,
    tap: str | None,
    tap_host_cidr: str | None,
    uplink_subnet: str | None,
) -> str | None:
    """The VM's network namespace (unless it is given or shared); its path for the jailer."""
    if config.netns is None and config.isolate_network:
        return _make_network(res, config, tap, tap_host_cidr, uplink_subnet)
    res.changed()
    return config.netns


def _make_network(
    res: JailResources,
    config: JailerConfig,
    tap: str | None,
    tap_host_cidr: str | None,
    uplink_subnet: str | None,
) -> str:
    """Create the VM's own namespace, tap and uplink; the path the jailer joins it by.

    A nameless one (:func:`_nameless_netns`) is a finished VM's, else a new one, held by its
    probe and joined through our descriptor of it, which is open until the VM is ready
    (:meth:`JailResources.close_netns_fd`). Otherwise it is ``ironclaw-<id>`` (refused if
    that name is taken), where the tap and uplink are set up by name.
    """
    if _nameless_netns(config, tap, uplink_subnet):
        res.changed()  # the run and jail directories are recorded before more is made
        res.netns_probe = ns.netns_pool.take() or ns.create_vm_netns()
        res.netns_fd = ns.open_netns(res.netns_probe)
        return f"/proc/{os.getpid()}/fd/{res.netns_fd}"
    name = cleanup.claim_netns(config.jailer_id)  # exclusive create: ours, or ConfigError
    res.netns_name = name
    res.changed()
    path = ns.create_claimed_netns(name)
    if tap is not None:
        ns.ensure_tap(name, tap, config.uid, config.gid, host_cidr=tap_host_cidr)
    if uplink_subnet is not None:
        ns.ensure_uplink(name, config.jailer_id, uplink_subnet)
    return str(path)


def _controllers(config: JailerConfig) -> set[str]:
    wanted = {"cpu", "memory"}
    if config.cpuset_cpus or config.cpuset_mems:
        wanted.add("cpuset")
    if config.pids_max is not None:
        wanted.add("pids")
    if _wants_io(config):
        wanted.add("io")
    return wanted


def _wants_io(config: JailerConfig) -> bool:
    return any(
        v is not None
        for v in (
            config.io_read_bps,
            config.io_write_bps,
            config.io_read_iops,
            config.io_write_iops,
        )
    )
