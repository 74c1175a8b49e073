"""Detached VMs: one supervisor process per VM, so that ``ironclaw vm start -d`` can return.

:func:`spawn_supervisor` starts ``python -m ironclaw_orchestrator.supervisor <state_dir>
<vm_id> <config file> <notify fd>`` in a new session (no controlling terminal, stdin from
/dev/null, stdout/stderr to ``<state_dir>/<vm_id>.log``) and waits until the supervisor says
the VM is running, or reports its error. The config travels in a 0600 file in the state
directory that the supervisor deletes after reading; the answer travels over a pipe.

The supervisor:

1. claims the VM id in the registry (so "id in use" is decided by the registry, once);
2. becomes a child subreaper (the jailer's VMM is re-parented to it and reaped by it);
3. gives the VM a uid/gid of its own (:meth:`Registry.allocate_ids`) unless the config
   sets them;
4. starts the VM (``start_firecracker``), records its pid and resources, boots it, marks
   the record ``running`` and tells the waiting parent;
5. waits for the VMM to exit or for SIGTERM/SIGINT/SIGHUP, then stops the VM, which removes
   everything made for it, and releases the record. If that cleanup fails the record is
   kept (its owner, the supervisor, is then gone) so ``ironclaw gc`` finishes the job.

If the supervisor itself is killed, the record names a dead owner and ``ironclaw gc``
kills the VMM and removes its resources.

:func:`stop_detached` stops a detached VM (SIGTERM to its verified supervisor, then the
``gc`` fallback); :func:`list_vms` lists registered VMs with their liveness.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import errors as errors_mod
from .errors import (
    CleanupError,
    ConfigError,
    IronclawError,
    RegistryError,
    UsageError,
    VmError,
    output_tail,
)
from .gc import GcReport, collect_garbage
from .registry import Registry, VmRecord, describe_process, is_alive, read_process_start

if TYPE_CHECKING:
    from .vm import FirecrackerProcess, VmConfig

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

DEFAULT_SPAWN_TIMEOUT_S = 60.0
#: The supervisor's own graceful stop (``SendCtrlAltDel``) takes up to 3 s; leave room.
DEFAULT_STOP_TIMEOUT_S = 15.0
CONFIG_PREFIX = ".config-"
SPAWN_LOG_PREFIX = ".spawn-"

#: Popen handles of supervisors this process started, so they are reaped, not left zombies.
_spawned: dict[int, subprocess.Popen[bytes]] = {}


# --------------------------------------------------------------------------- parent side


def reap_supervisors() -> None:
    """Reap the supervisors this process started that have exited (no zombies left)."""
    for pid, proc in list(_spawned.items()):
        if proc.poll() is not None:
            _spawned.pop(pid, None)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _read_message(fd: int, timeout_s: float) -> dict[str, Any] | None:
    """One JSON line from the supervisor; ``None`` on EOF; ``TimeoutError`` if none in time.

    Read through the event loop (not a thread), so that Ctrl-C can cancel the wait at once.
    """
    loop = asyncio.get_running_loop()
    buf = b""
    os.set_blocking(fd, False)
    async with asyncio.timeout(timeout_s):
        while b"\n" not in buf:
            readable: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, _set_once, readable)
            try:
                await readable
            finally:
                loop.remove_reader(fd)
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                break
            buf += chunk
    line = buf.split(b"\n", 1)[0]
    if not line:
        return None
    try:
        msg = json.loads(line)
    except ValueError:
        return {"event": "error", "type": "VmError", "message": line.decode(errors="replace")}
    return msg if isinstance(msg, dict) else None


def _error_from(msg: dict[str, Any], vm_id: str) -> IronclawError:
    """Rebuild the supervisor's exception in this process (same class where possible)."""
    message = str(msg.get("message") or "the supervisor failed")
    cls = getattr(errors_mod, str(msg.get("type", "")), None)
    if isinstance(cls, type) and issubclass(cls, IronclawError):
        try:
            return cls(message)
        except TypeError:
            pass
    return VmError(message, vm_id=vm_id)


async def spawn_supervisor(
    config: VmConfig,
    registry: Registry,
    *,
    timeout_s: float = DEFAULT_SPAWN_TIMEOUT_S,
) -> VmRecord:
    """Start ``config`` as a detached VM owned by a new supervisor process.

    Returns the VM's record once it is running. Raises the supervisor's error (same
    exception class: ``RegistryError`` if the id is in use, ``SandboxRequiredError``,
    ``JailerError``, ...) if the VM could not be started; nothing is left behind then.
    """
    vm_id = config.vm_id
    reap_supervisors()
    token = secrets.token_hex(8)
    cfg_path = registry.state_dir / f"{CONFIG_PREFIX}{token}.json"
    spawn_log = registry.state_dir / f"{SPAWN_LOG_PREFIX}{token}.tmp"
    # Only what was set: defaults re-derive in the supervisor exactly as they would here.
    _write_private(cfg_path, config.model_dump_json(exclude_unset=True).encode())
    read_fd, write_fd = os.pipe()
    try:
        log_fd = os.open(spawn_log, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ironclaw_orchestrator.supervisor",
                    str(registry.state_dir),
                    vm_id,
                    cfg_path.name,
                    str(write_fd),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                pass_fds=(write_fd,),
                close_fds=True,
                cwd="/",
            )
        finally:
            os.close(log_fd)
    except BaseException:
        os.close(read_fd)
        for path in (cfg_path, spawn_log):
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    finally:
        os.close(write_fd)
    _spawned[proc.pid] = proc
    try:
        try:
            msg = await _read_message(read_fd, timeout_s)
        except TimeoutError:
            await _abandon(proc, registry, vm_id)
            raise VmError(
                f"VM {vm_id}: the supervisor (pid {proc.pid}) did not report the VM running "
                f"within {timeout_s:g}s; it was stopped. Its log:\n"
                f"{_log_tail(registry, vm_id, spawn_log)}",
                vm_id=vm_id,
            ) from None
    finally:
        os.close(read_fd)
    if msg is not None and msg.get("event") == "running":
        record = registry.get(vm_id)
        if record is None:
            raise VmError(
                f"VM {vm_id}: the supervisor reported it running but its record is gone "
                "(it stopped at once?); see `ironclaw vm ls`",
                vm_id=vm_id,
            )
        return record
    # An error, or EOF: the supervisor has cleaned up and is exiting.
    code = await asyncio.to_thread(_wait_child, proc, 30.0)
    if msg is not None:
        raise _error_from(msg, vm_id)
    tail = _log_tail(registry, vm_id, spawn_log)
    rec = registry.get(vm_id)
    if rec is not None and rec.owner_pid == proc.pid:
        await asyncio.to_thread(collect_garbage, registry, vm_ids=[vm_id], orphan_grace_s=0.0)
    raise VmError(
        f"VM {vm_id}: the supervisor (pid {proc.pid}) exited with code {code} before the VM "
        f"ran; its output:\n{tail}",
        vm_id=vm_id,
    )


def _wait_child(proc: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    try:
        code = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return None
    _spawned.pop(proc.pid, None)
    return code


def _log_tail(registry: Registry, vm_id: str, spawn_log: Path) -> str:
    for path in (spawn_log, registry.log_path(vm_id)):
        with contextlib.suppress(OSError):
            return output_tail(path.read_text(errors="replace")) or "(empty)"
    return "(no log)"


async def _abandon(proc: subprocess.Popen[bytes], registry: Registry, vm_id: str) -> None:
    """Stop a supervisor that did not answer: SIGTERM, then SIGKILL and gc."""
    proc.send_signal(signal.SIGTERM)
    if await asyncio.to_thread(_wait_child, proc, DEFAULT_STOP_TIMEOUT_S) is None:
        proc.kill()
        await asyncio.to_thread(_wait_child, proc, 5.0)
    rec = registry.get(vm_id)
    if rec is not None and rec.owner_pid == proc.pid:
        await asyncio.to_thread(collect_garbage, registry, vm_ids=[vm_id], orphan_grace_s=0.0)


# --------------------------------------------------------------------------- stop and list


async def _pidfd_exited(pidfd: int, timeout_s: float) -> bool:
    """Wait until the process behind ``pidfd`` exits; False on timeout."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_reader(pidfd, done.set)
    try:
        async with asyncio.timeout(timeout_s):
            await done.wait()
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)


def _reap_pidfd(pid: int, pidfd: int) -> None:
    proc = _spawned.pop(pid, None)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(0.5)
        return
    with contextlib.suppress(ChildProcessError):
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)


async def stop_detached(
    registry: Registry, vm_id: str, timeout_s: float = DEFAULT_STOP_TIMEOUT_S
) -> GcReport | None:
    """Stop the detached VM ``vm_id``; return once its record (and everything) is gone.

    Sends SIGTERM to its supervisor (after checking pid + start time, through a pidfd) and
    waits up to ``timeout_s`` for it to stop the VM and exit. If it does not, or it was
    already dead, it is killed and ``gc`` removes the VM: the :class:`GcReport` of that
    fallback is returned (``None`` when the supervisor did the work). Raises
    ``RegistryError`` if there is no such VM, ``UsageError`` if it is not detached, and
    ``CleanupError`` if the fallback left something behind.
    """
    rec = registry.get(vm_id)
    if rec is None:
        raise RegistryError(
            f"there is no VM {vm_id} in the registry {registry.state_dir}: see `ironclaw vm ls`"
        )
    owner = describe_process(rec.owner_pid, rec.owner_start_time)
    if not rec.detached and rec.owner_alive():
        raise UsageError(
            f"VM {vm_id} is not detached: it belongs to {owner}, a program of its own; stop it "
            "there (stopping that program stops the VM)"
        )
    pidfd: int | None = None
    with contextlib.suppress(ProcessLookupError):
        pidfd = os.pidfd_open(rec.owner_pid)
    try:
        if pidfd is not None and is_alive(rec.owner_pid, rec.owner_start_time):
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            if not await _pidfd_exited(pidfd, timeout_s):
                log.warning(
                    "VM %s: supervisor %s did not stop within %gs; killing it",
                    vm_id,
                    owner,
                    timeout_s,
                )
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                await _pidfd_exited(pidfd, 5.0)
        if pidfd is not None and read_process_start(rec.owner_pid) == rec.owner_start_time:
            _reap_pidfd(rec.owner_pid, pidfd)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    reap_supervisors()
    if registry.get(vm_id) is None:
        return None
    report = await asyncio.to_thread(collect_garbage, registry, vm_ids=[vm_id], orphan_grace_s=0.0)
    if not report.ok:
        raise CleanupError(
            f"VM {vm_id}: its supervisor is gone but cleanup left resources behind; fix the "
            "causes below and run `ironclaw gc`",
            [f"{a.kind} {a.name}: {a.error}" for a in report.errors],
        )
    return report


@dataclass(frozen=True)
class VmStatus:
    """A registered VM and whether its owner and VMM are alive (``ironclaw vm ls``)."""

    record: VmRecord
    owner_alive: bool
    vmm_alive: bool

    @property
    def status(self) -> str:
        if not self.owner_alive:
            return "stale"  # owner gone: `ironclaw gc` cleans it up
        if self.record.state == "running" and not self.vmm_alive:
            return "exited"
        return self.record.state

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "owner_alive": self.owner_alive,
            "vmm_alive": self.vmm_alive,
            **self.record.model_dump(mode="json"),
        }


def list_vms(registry: Registry) -> list[VmStatus]:
    """Every registered VM (detached or not), sorted by id, with liveness."""
    return [
        VmStatus(record=r, owner_alive=r.owner_alive(), vmm_alive=r.vmm_alive())
        for r in registry.list()
    ]


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


def _load_config(registry: Registry, vm_id: str, name: str) -> VmConfig:
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
    try:
        registry = Registry(state_dir)
        config = _load_config(registry, vm_id, config_name)
    except Exception as exc:
        log.error("%s", exc)
        notifier.error(exc)
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
        return await _run(registry, config, stop, notifier)
    finally:
        notifier.close()


async def _run(
    registry: Registry, config: VmConfig, stop: asyncio.Event, notifier: _Notifier
) -> int:
    from .vm import start_firecracker
    from .vm.process import become_subreaper

    vm_id = config.vm_id
    try:
        become_subreaper()
        jailer = config.jailer
        if jailer is None or not {"uid", "gid"} & jailer.model_fields_set:
            uid, gid = registry.allocate_ids(vm_id)
            config = _with_ids(config, uid, gid)
        else:
            registry.update(vm_id, uid=jailer.uid, gid=jailer.gid)
        # The id is claimed here already: start_firecracker records each resource before
        # it is made (so a crash mid-start leaves a record naming everything for gc).
        vm = await _start_unless_stopped(
            start_firecracker(config, registry=registry, claim=False), stop, vm_id
        )
    except BaseException as exc:
        log.error("VM %s did not start: %s", vm_id, exc)
        notifier.error(exc)
        registry.release(vm_id)  # start_firecracker removed what it made
        return 1

    code = 0
    cleaned = False
    try:
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
