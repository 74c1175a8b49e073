"""Development mode: firecracker run directly, without the jailer (spec: Graceful Degradation).

INSECURE: no chroot, no cgroup limits, no privilege drop. Used only when the jailer cannot run
here and the sandbox is not required. The VMM still gets a private 0700 run directory for its
socket and console log, and is stopped and cleaned up exactly like a jailed one.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CleanupError
from ..safefs import check_run_root
from .api import FirecrackerApi
from .binaries import find_firecracker, read_version
from .cancelsafe import finish
from .cleanup import remove_run_dir
from .config import VmConfig
from .consolelog import ConsolePump
from .hostcheck import check_kvm, check_socket_budget
from .jailer_args import firecracker_args
from .lifecycle import DEFAULT_READY_TIMEOUT_S, VmmHandle, abort_start, wait_ready
from .process import ChildProcess
from .rundir import CONSOLE_LOG, create_vm_run_dir, run_root, vm_run_dir

API_SOCKET_NAME = "firecracker.socket"


class UnjailedProcess(VmmHandle):
    """A firecracker process running directly on the host (development mode)."""

    jailed = False

    def __init__(
        self, *, vm_id: str, process: ChildProcess, run_dir: Path, api: FirecrackerApi,
        firecracker: Path, console: ConsolePump | None = None,
    ) -> None:  # fmt: skip
        super().__init__(
            vm_id=vm_id, process=process, api=api, console_path=run_dir / CONSOLE_LOG,
            console=console,
        )  # fmt: skip
        self.run_dir = run_dir
        self.firecracker = firecracker

    @property
    def api_socket(self) -> Path:
        return self.run_dir / API_SOCKET_NAME

    def _release(self) -> None:
        _remove_run_dir(self.vm_id, self.run_dir)


def _remove_run_dir(vm_id: str, run_dir: Path) -> None:
    try:
        remove_run_dir(run_dir)
    except OSError as exc:
        raise CleanupError(f"VM {vm_id}: could not remove {run_dir}", [str(exc)]) from exc


async def start_unjailed(
    config: VmConfig, *, ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S
) -> UnjailedProcess:
    """Start firecracker directly in a private run directory; return once its API answers."""
    jc = config.jailer
    explicit = jc.exec_file if jc is not None and "exec_file" in jc.model_fields_set else None
    firecracker = find_firecracker(explicit)
    read_version(firecracker, "firecracker")
    check_kvm()
    check_run_root(run_root())
    socket = vm_run_dir(config.vm_id) / API_SOCKET_NAME
    check_socket_budget(socket)
    run_dir = create_vm_run_dir(config.vm_id)
    process: ChildProcess | None = None
    api: FirecrackerApi | None = None
    pump: ConsolePump | None = None
    try:
        console = run_dir / CONSOLE_LOG
        pump = ConsolePump(console, config.console_limit_bytes)
        process = ChildProcess.spawn(
            [str(firecracker), "--id", config.vm_id, *firecracker_args(socket)],
            stdout_fd=pump.write_fd,
        )
        _ = process.start_time  # now, while the pid is surely ours (read once, cached)
        pump.child_started()
        pump.attach()
        api = FirecrackerApi(socket, vm_id=config.vm_id)
        await wait_ready(
            process, api, socket, vm_id=config.vm_id, console_path=console,
            timeout_s=ready_timeout_s,
        )  # fmt: skip
    except BaseException:
        await finish(abort_start(process, api))  # completes even if cancelled (again)
        if pump is not None:
            pump.close()
        _remove_run_dir(config.vm_id, run_dir)
        raise
    return UnjailedProcess(
        vm_id=config.vm_id, process=process, run_dir=run_dir, api=api, firecracker=firecracker,
        console=pump,
    )  # fmt: skip
