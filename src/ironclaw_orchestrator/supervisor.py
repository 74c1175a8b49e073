"""Detached VMs, the supervisor's side: one process per VM, so ``vm start -d`` can return.

Run as ``python -m ironclaw_orchestrator.supervisor STATE_DIR VM_ID CONFIG_FILE [NOTIFY_FD]``
by :func:`ironclaw_orchestrator.detach.spawn_supervisor`. The supervisor:

1. claims the VM id in the registry (so "id in use" is decided by the registry, once);
   for a restore (:class:`~ironclaw_orchestrator.detach.RestoreRequest`) it verifies the
   snapshot first and claims the id with the clone's config;
2. becomes a child subreaper (the jailer's VMM is re-parented to it and reaped by it);
3. gives the VM a uid/gid of its own (:meth:`Registry.allocate_ids`) unless the config
   sets them;
4. starts the VM (``start_firecracker``), records its pid and resources, boots it (or
   restores the snapshot into a fresh jail: ``restore_snapshot``), marks the record
   ``running`` and tells the waiting parent;
5. waits for the VMM to exit or for SIGTERM/SIGINT/SIGHUP, then stops the VM, which removes
   everything made for it, and releases the record. If that cleanup fails the record is
   kept (its owner, the supervisor, is then gone) so ``ironclaw gc`` finishes the job.

If the supervisor itself is killed, the record names a dead owner and ``ironclaw gc``
kills the VMM and removes its resources. The caller's side (spawn, stop, list) lives in
:mod:`ironclaw_orchestrator.detach` and is re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .detach import (
    CONFIG_PREFIX,
    DEFAULT_SPAWN_TIMEOUT_S,
    DEFAULT_STOP_TIMEOUT_S,
    SPAWN_LOG_PREFIX,
    RestoreRequest,
    VmStatus,
    list_vms,
    reap_supervisors,
    spawn_supervisor,
    stop_detached,
)
from .errors import CleanupError, ConfigError, IronclawError, RegistryError, VmError
from .registry import Registry

if TYPE_CHECKING:
    from .vm import FirecrackerProcess, Snapshot, VmConfig

__all__ = [
    "DEFAULT_SPAWN_TIMEOUT_S",
    "DEFAULT_STOP_TIMEOUT_S",
    "VmStatus",
    "list_vms",
    "main",
    "reap_supervisors",
    "spawn_supervisor",
    "stop_detached",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- supervisor side


class _Notifier:
    """Sends the one answer the parent waits for, then closes the pipe."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def send(self, msg: dict[str, Any]) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self.fd, json.dumps(msg).encode() + b"\n")
        self.close()

    def error(self, exc: BaseException) -> None:
        self.send({"event": "error", "type": type(exc).__name__, "message": str(exc)})

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


def _load_config(registry: Registry, vm_id: str, name: str) -> VmConfig | RestoreRequest:
    from .vm import VmConfig

    if not name.startswith(CONFIG_PREFIX) or "/" in name:
        raise ConfigError(f"VM {vm_id}: invalid config file name {name!r}")
    path = registry.state_dir / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"VM {vm_id}: cannot read its config {path}: {exc.strerror}") from exc
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
    request = json.loads(data)
    if isinstance(request, dict) and set(request) == {"restore"}:
        return RestoreRequest.model_validate(request["restore"])
    config = VmConfig.model_validate_json(data)
    if config.vm_id != vm_id:
        raise ConfigError(f"VM {vm_id}: its config file names VM {config.vm_id!r}")
    return config


def _adopt_spawn_log(registry: Registry, vm_id: str) -> None:
    """Rename our stdout file from its spawn name to ``<vm_id>.log`` (once the id is ours)."""
    with contextlib.suppress(OSError):
        current = Path(os.readlink("/proc/self/fd/1"))
        if current.parent == registry.state_dir and current.name.startswith(SPAWN_LOG_PREFIX):
            os.replace(current, registry.log_path(vm_id))


def _drop_spawn_log(registry: Registry) -> None:
    with contextlib.suppress(OSError):
        current = Path(os.readlink("/proc/self/fd/1"))
        if current.parent == registry.state_dir and current.name.startswith(SPAWN_LOG_PREFIX):
            current.unlink()


def _with_ids(config: VmConfig, uid: int, gid: int) -> VmConfig:
    from .vm import JailerConfig

    jailer = (config.jailer or JailerConfig()).model_copy(update={"uid": uid, "gid": gid})
    return config.model_copy(update={"jailer": jailer})


async def _supervise(state_dir: Path, vm_id: str, config_name: str, notify_fd: int | None) -> int:
    notifier = _Notifier(notify_fd)
    restore: tuple[Snapshot, bool] | None = None
    registry: Registry | None = None
    try:
        registry = Registry(state_dir)
        request = _load_config(registry, vm_id, config_name)
        if isinstance(request, RestoreRequest):
            restore, config = await _verified_snapshot(request, vm_id)
        else:
            config = request
    except Exception as exc:
        log.error("%s", exc)
        notifier.error(exc)
        if registry is not None:
            _drop_spawn_log(registry)  # the error went to the parent; no VM, no log
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    try:
        registry.claim(
            vm_id,
            detached=True,
            config=config.model_dump(mode="json"),
            vcpus=config.vcpu_count,
            memory_mb=config.memory_mb,
            log_path=registry.log_path(vm_id),
        )
    except Exception as exc:
        log.error("%s", exc)
        notifier.error(exc)
        _drop_spawn_log(registry)
        return 1
    _adopt_spawn_log(registry, vm_id)
    try:
        return await _run(registry, config, stop, notifier, restore)
    finally:
        notifier.close()


async def _verified_snapshot(
    request: RestoreRequest, vm_id: str
) -> tuple[tuple[Snapshot, bool], VmConfig]:
    """The snapshot, verified (sizes, SHA-256) before the id is even claimed, and the
    clone's config."""
    from .vm import Snapshot
    from .vm.restore import clone_config

    snap = await asyncio.to_thread(Snapshot.load, request.snapshot_dir)
    return (snap, request.resume), clone_config(snap, vm_id)


async def _run(
    registry: Registry,
    config: VmConfig,
    stop: asyncio.Event,
    notifier: _Notifier,
    restore: tuple[Snapshot, bool] | None = None,
) -> int:
    from .vm import restore_snapshot, start_firecracker
    from .vm.process import become_subreaper

    vm_id = config.vm_id
    try:
        become_subreaper()
        if restore is not None:
            # The clone gets a uid/gid of its own from the registry (the id is claimed).
            snap, resume = restore
            starting: Any = restore_snapshot(
                snap, vm_id, resume=resume, registry=registry, claim=False
            )
        else:
            jailer = config.jailer
            if jailer is None or not {"uid", "gid"} & jailer.model_fields_set:
                uid, gid = registry.allocate_ids(vm_id)
                config = _with_ids(config, uid, gid)
            else:
                registry.update(vm_id, uid=jailer.uid, gid=jailer.gid)
            # The id is claimed here already: start_firecracker records each resource
            # before it is made (so a crash mid-start leaves a record naming everything).
            starting = start_firecracker(config, registry=registry, claim=False)
        vm = await _start_unless_stopped(starting, stop, vm_id)
    except BaseException as exc:
        log.error("VM %s did not start: %s", vm_id, exc)
        notifier.error(exc)
        registry.release(vm_id)  # start_firecracker removed what it made
        return 1

    code = 0
    cleaned = False
    try:
        if restore is None:
            await vm.start_instance()
        registry.update(vm_id, state="running")
        log.info("VM %s running (VMM pid %d)", vm_id, vm.pid)
        notifier.send({"event": "running", "vm_id": vm_id, "vmm_pid": vm.pid})
        code = await _wait_or_stop(vm, stop)
    except BaseException as exc:
        log.error("VM %s failed: %s", vm_id, exc)
        notifier.error(exc)
        code = 1
    finally:
        with contextlib.suppress(RegistryError):
            registry.update(vm_id, state="stopping")
        try:
            await vm.stop()  # on failure the record is left naming what remains
            cleaned = True
        except CleanupError as exc:
            log.error("%s", exc)
    if not cleaned:
        return 1  # the record stays, naming what is left, for `ironclaw gc`
    registry.release(vm_id)
    log.info("VM %s stopped and cleaned up", vm_id)
    return code


async def _start_unless_stopped(
    starting: Any, stop: asyncio.Event, vm_id: str
) -> FirecrackerProcess:
    """Await ``start_firecracker(...)``; a stop signal meanwhile cancels it (it cleans up)."""
    start_task: asyncio.Task[FirecrackerProcess] = asyncio.ensure_future(starting)
    stop_task = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({start_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop_task.cancel()
    if not start_task.done():
        start_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await start_task
        raise VmError(f"VM {vm_id}: stopped by a signal while starting", vm_id=vm_id)
    return start_task.result()


async def _wait_or_stop(vm: FirecrackerProcess, stop: asyncio.Event) -> int:
    wait_task = asyncio.ensure_future(vm.wait())
    stop_task = asyncio.ensure_future(stop.wait())
    await asyncio.wait({wait_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    stop_task.cancel()
    if wait_task.done():
        try:
            code = wait_task.result()
        except IronclawError as exc:  # e.g. OutOfMemoryError
            log.error("VM %s: %s", vm.vm_id, exc)
            return 1
        log.info("VM %s: the VMM exited with code %d", vm.vm_id, code)
        return 0
    log.info("VM %s: stop requested", vm.vm_id)
    wait_task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await wait_task
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ironclaw_orchestrator.supervisor STATE_DIR VM_ID CONFIG_FILE [NOTIFY_FD]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (3, 4):
        print(main.__doc__, file=sys.stderr)
        return 2
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    notify_fd = int(args[3]) if len(args) == 4 else None
    return asyncio.run(_supervise(Path(args[0]), args[1], args[2], notify_fd))


if __name__ == "__main__":
    sys.exit(main())
