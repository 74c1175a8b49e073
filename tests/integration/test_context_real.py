"""``async with start_firecracker(...)`` / ``start_with_jailer(...)`` with the real binaries:
the VM and everything made for it are gone after the block, however it ends."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from jailcheck import assert_jailed

from ironclaw_orchestrator import JailerConfig, VmConfig, start_firecracker, start_with_jailer
from ironclaw_orchestrator.vm.probe import (
    PROBE_BOOT_ARGS,
    READY_LINE,
    ProbeBehaviour,
    probe_kernel_path,
)

pytestmark = pytest.mark.integration


def halt_config(vm_id: str) -> VmConfig:
    return VmConfig(
        vm_id=vm_id,
        kernel_path=str(probe_kernel_path(ProbeBehaviour.HALT)),
        rootfs_path=None,
        memory_mb=128,
        boot_args=PROBE_BOOT_ARGS,
    )


async def _ready(console: Path) -> None:
    for _ in range(2000):
        if READY_LINE.encode() in console.read_bytes():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no ready line in {console}")


@pytest.mark.parametrize("jailed", [True, False], ids=["jailed", "unjailed"])
async def test_cancelled_block_stops_and_cleans_up(vm_id: str, jailed: bool) -> None:
    seen: dict[str, object] = {}
    entered = asyncio.Event()

    async def run() -> None:
        async with start_firecracker(halt_config(vm_id), use_jailer=jailed) as vm:
            await vm.start_instance()
            await _ready(vm.console_path)
            if jailed:
                assert_jailed(vm)
            seen.update(pid=vm.pid, sandboxed=vm.is_sandboxed, console=vm.console_path)
            entered.set()
            await asyncio.sleep(3600)  # the guest halts forever: only a cancel ends this

    task = asyncio.create_task(run())
    await asyncio.wait_for(entered.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen["sandboxed"] is jailed
    assert not os.path.exists(f"/proc/{seen['pid']}")
    assert not Path(str(seen["console"])).parent.exists()  # the run dir went with it
    # (the vm_id fixture asserts no jail dir, cgroup, netns, run dir or record is left)


async def test_exception_in_block_stops_and_cleans_up(vm_id: str) -> None:
    with pytest.raises(RuntimeError, match="agent crashed"):
        async with start_firecracker(halt_config(vm_id)) as vm:
            await vm.start_instance()
            assert_jailed(vm)
            pid = vm.pid
            raise RuntimeError("agent crashed")
    assert not os.path.exists(f"/proc/{pid}")


async def test_start_with_jailer_as_context(vm_id: str, chroot_base: Path) -> None:
    config = JailerConfig(jailer_id=vm_id, chroot_base_dir=chroot_base, memory_limit_mb=256)
    async with start_with_jailer(config) as proc:
        assert proc.jailed and proc.api_socket.is_socket()
        jail = proc.jail_dir
        pid = proc.pid
    assert not os.path.exists(f"/proc/{pid}") and not jail.exists()
