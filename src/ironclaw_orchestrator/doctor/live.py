"""The live check of ``ironclaw doctor``: boot the built-in probe guest and time it.

The probe guest (:mod:`ironclaw_orchestrator.vm.probe`) is booted exactly as
``start_firecracker`` boots a VM (jailed, or unjailed in development mode); every VM is
stopped and cleaned up, also when a step fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from pathlib import Path

from ..errors import IronclawError
from ..vm.config import JailerConfig, VmConfig
from .report import DOCTOR_ID_PREFIX, Check, Status, _first_line

#: Deadline for each live-boot step (spawn, guest ready line, guest exit).
LIVE_STEP_TIMEOUT_S = 20.0


def _live_vm_config(config: JailerConfig, kernel: Path, vm_id: str, jailed: bool) -> VmConfig:
    from ..vm.probe import PROBE_BOOT_ARGS

    # Keep the user's jail settings, but let the VM derive id, vCPUs and memory limit.
    chosen = config.model_dump(
        exclude_unset=True, exclude={"jailer_id", "cpu_count", "memory_limit_mb"}
    )
    return VmConfig(
        vm_id=vm_id,
        kernel_path=str(kernel),
        rootfs_path=None,
        memory_mb=128,
        boot_args=PROBE_BOOT_ARGS,
        require_sandbox=jailed,
        jailer=JailerConfig(**chosen),
    )


async def _wait_for_line(path: Path, line: str, timeout_s: float) -> None:
    needle = line.encode()
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError):
            if needle in path.read_bytes():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {line!r} on the console within {timeout_s:.0f} s")
        await asyncio.sleep(0.005)


async def run_live_check(config: JailerConfig | None = None, *, jailed: bool = True) -> Check:
    """Boot the probe guest (reset behaviour) and time it; always stopped and cleaned up."""
    from ..vm import FirecrackerProcess, start_firecracker
    from ..vm.probe import READY_LINE, ProbeBehaviour, probe_kernel_path

    config = config or JailerConfig()
    name = "live boot (jailed)" if jailed else "live boot (unjailed)"
    vm_id = f"{DOCTOR_ID_PREFIX}{secrets.token_hex(3)}"
    timings: dict[str, object] = {"vm_id": vm_id}
    vm: FirecrackerProcess | None = None
    step = "building the probe kernel"
    try:
        kernel = await asyncio.to_thread(probe_kernel_path, ProbeBehaviour.RESET)
        cfg = _live_vm_config(config, kernel, vm_id, jailed)
        step = "spawning the VMM"
        t0 = time.monotonic()
        vm = await start_firecracker(cfg, use_jailer=jailed, ready_timeout_s=LIVE_STEP_TIMEOUT_S)
        t1 = time.monotonic()
        timings["spawn_to_api_ready_ms"] = round((t1 - t0) * 1000, 1)
        timings["sandboxed"] = vm.is_sandboxed
        step = "booting the guest"
        await vm.start_instance()
        await _wait_for_line(vm.console_path, READY_LINE, LIVE_STEP_TIMEOUT_S)
        t2 = time.monotonic()
        timings["start_to_ready_line_ms"] = round((t2 - t1) * 1000, 1)
        step = "waiting for the guest to exit"
        code = await asyncio.wait_for(vm.wait(), LIVE_STEP_TIMEOUT_S)
        t3 = time.monotonic()
        timings["ready_to_exit_ms"] = round((t3 - t2) * 1000, 1)
        timings["exit_code"] = code
        step = "stopping and cleaning up"
        await vm.stop()
        vm = None
        timings["stop_cleanup_ms"] = round((time.monotonic() - t3) * 1000, 1)
        if code != 0:
            raise RuntimeError(f"the VMM exited with status {code} instead of 0")
    except (IronclawError, TimeoutError, RuntimeError, OSError) as exc:
        return Check(
            name, Status.FAIL, f"failed while {step}: {_first_line(exc)}",
            _live_fix(exc), details={**timings, "error": str(exc)},
        )  # fmt: skip
    finally:
        if vm is not None:
            with contextlib.suppress(Exception):
                await vm.stop()
    value = (
        f"spawn->API {timings['spawn_to_api_ready_ms']} ms, start->ready "
        f"{timings['start_to_ready_line_ms']} ms, ->exit {timings['ready_to_exit_ms']} ms, "
        f"stop+cleanup {timings['stop_cleanup_ms']} ms"
    )
    return Check(name, Status.PASS, value, details=timings)


def _live_fix(exc: BaseException) -> str:
    from ..errors import (
        ApiSocketTimeoutError,
        CgroupError,
        ChrootBaseError,
        HostError,
        OutOfMemoryError,
        VmExitedError,
    )

    if isinstance(exc, ChrootBaseError):
        return "fix the chroot base (see the 'chroot base' check)"
    if isinstance(exc, CgroupError):
        return "fix the cgroup checks above (controllers / delegation)"
    if isinstance(exc, HostError):
        return "fix the failed checks above first"
    if isinstance(exc, OutOfMemoryError):
        return "raise jailer.memory_limit_mb (guest memory + VMM overhead + headroom)"
    if isinstance(exc, VmExitedError):
        return "the VM exited immediately: check the console output in the error and the limits"
    if isinstance(exc, ApiSocketTimeoutError):
        return "the API socket was not created: check the jailer output and the socket budget"
    return "re-run with -v for debug logging and check the error above"
