"""Detached VMs, the caller's side: start a supervisor per VM, stop it, list VMs.

:func:`spawn_supervisor` starts ``python -m ironclaw_orchestrator.supervisor <state_dir>
<vm_id> <config file> <notify fd>`` in a new session (no controlling terminal, stdin from
/dev/null, stdout/stderr to ``<state_dir>/<vm_id>.log``) and waits until the supervisor says
the VM is running, or reports its error. The config travels in a 0600 file in the state
directory that the supervisor deletes after reading; the answer travels over a pipe.
:func:`spawn_restore_supervisor` does the same for a VM restored from a snapshot: the file
holds a :class:`RestoreRequest` instead, and the supervisor verifies the snapshot itself.

:func:`stop_detached` stops a detached VM (SIGTERM to its verified supervisor through a
pidfd, then the ``gc`` fallback); :func:`list_vms` lists registered VMs with their liveness.
The supervisor's own side is :mod:`ironclaw_orchestrator.supervisor`.
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from . import errors as errors_mod
from . import pidfd as pidfds
from .errors import CleanupError, IronclawError, RegistryError, UsageError, VmError, output_tail
from .gc import GcReport, collect_garbage
from .procfs import describe_process, is_alive, read_start_time
from .registry import Registry, VmRecord
from .vm.cancelsafe import finish

if TYPE_CHECKING:
    from .vm import VmConfig

__all__ = [
    "CONFIG_PREFIX",
    "DEFAULT_SPAWN_TIMEOUT_S",
    "DEFAULT_STOP_TIMEOUT_S",
    "SPAWN_LOG_PREFIX",
    "RestoreRequest",
    "VmStatus",
    "list_vms",
    "reap_supervisors",
    "spawn_restore_supervisor",
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


class RestoreRequest(BaseModel):
    """What a supervisor restores (the config file of :func:`spawn_restore_supervisor`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    #: The snapshot directory (absolute); the supervisor verifies it before anything starts.
    snapshot_dir: str
    resume: bool = True


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
    # Only what was set: defaults re-derive in the supervisor exactly as they would here.
    payload = config.model_dump_json(exclude_unset=True).encode()
    return await _spawn(config.vm_id, payload, registry, timeout_s)


async def spawn_restore_supervisor(
    snapshot_dir: Path,
    vm_id: str,
    registry: Registry,
    *,
    resume: bool = True,
    timeout_s: float = DEFAULT_SPAWN_TIMEOUT_S,
) -> VmRecord:
    """Restore the snapshot in ``snapshot_dir`` as the detached VM ``vm_id`` (a new
    supervisor verifies it, restores it into a fresh jail and keeps it running).

    Returns the VM's record once it runs (paused with ``resume=False``); raises the
    supervisor's error (``ConfigError`` for a damaged snapshot, ``VersionMismatchError``,
    ``RegistryError`` if the id is in use, ...) and leaves nothing behind otherwise.
    """
    request = RestoreRequest(snapshot_dir=str(Path(snapshot_dir).absolute()), resume=resume)
    payload = json.dumps({"restore": request.model_dump()}).encode()
    return await _spawn(vm_id, payload, registry, timeout_s)


async def _spawn(vm_id: str, payload: bytes, registry: Registry, timeout_s: float) -> VmRecord:
    reap_supervisors()
    token = secrets.token_hex(8)
    cfg_path = registry.state_dir / f"{CONFIG_PREFIX}{token}.json"
    spawn_log = registry.state_dir / f"{SPAWN_LOG_PREFIX}{token}.tmp"
    _write_private(cfg_path, payload)
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
        except asyncio.CancelledError:
            # Ctrl-C, a timeout around us: the supervisor must not go on starting the VM
            # unwatched. Stopped (it undoes its start) even if cancelled again meanwhile.
            await finish(_abandon(proc, registry, vm_id, cfg_path, spawn_log))
            raise
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


async def _abandon(
    proc: subprocess.Popen[bytes], registry: Registry, vm_id: str, *leftover_files: Path
) -> None:
    """Stop a supervisor that did not answer: SIGTERM, then SIGKILL and gc.

    ``leftover_files`` (its config and spawn log) are removed if it died before it took
    them over (a SIGTERM before its handlers are installed kills it outright).
    """
    proc.send_signal(signal.SIGTERM)
    if await asyncio.to_thread(_wait_child, proc, DEFAULT_STOP_TIMEOUT_S) is None:
        proc.kill()
        await asyncio.to_thread(_wait_child, proc, 5.0)
    for path in leftover_files:
        with contextlib.suppress(OSError):
            path.unlink()
    rec = registry.get(vm_id)
    if rec is not None and rec.owner_pid == proc.pid:
        await asyncio.to_thread(collect_garbage, registry, vm_ids=[vm_id], orphan_grace_s=0.0)


# --------------------------------------------------------------------------- stop and list


def _reap_owner(pid: int, pidfd: int) -> None:
    """Reap a supervisor we started (through its Popen, which must learn it exited)."""
    proc = _spawned.pop(pid, None)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(0.5)
        return
    pidfds.reap(pidfd)


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
    with pidfds.opened(rec.owner_pid) as pidfd:
        # The pidfd pins the process: if pid + start time match now, we signal the owner.
        if pidfd is not None and is_alive(rec.owner_pid, rec.owner_start_time):
            pidfds.send_signal(pidfd, signal.SIGTERM)
            if not await pidfds.wait_exit_async(pidfd, timeout_s):
                log.warning(
                    "VM %s: supervisor %s did not stop within %gs; killing it",
                    vm_id,
                    owner,
                    timeout_s,
                )
                pidfds.send_signal(pidfd, signal.SIGKILL)
                await pidfds.wait_exit_async(pidfd, 5.0)
        if pidfd is not None and read_start_time(rec.owner_pid) == rec.owner_start_time:
            _reap_owner(rec.owner_pid, pidfd)
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
