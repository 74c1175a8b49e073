"""Resource limits that hold, and stats that tell the truth, on this host's real cgroups."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from ironclaw_orchestrator.errors import CgroupControllerUnavailableError, OutOfMemoryError
from ironclaw_orchestrator.vm import FirecrackerProcess, JailerConfig, VmConfig, start_firecracker
from ironclaw_orchestrator.vm.jailer import JailFile, start_with_jailer
from ironclaw_orchestrator.vm.probe import (
    PROBE_BOOT_ARGS,
    READY_LINE,
    ProbeBehaviour,
    probe_kernel_path,
)

pytestmark = pytest.mark.integration
KERNEL = Path("/vmlinux")


async def wait_console(vm: FirecrackerProcess, text: str) -> None:
    for _ in range(4000):
        if text in vm.console_path.read_text(errors="replace"):
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{text!r} not on the console:\n{vm.console_tail()}")


def probe_vm(
    vm_id: str, behaviour: ProbeBehaviour, memory_mb: int = 128, touch: int = 0, **jailer: object
) -> VmConfig:
    return VmConfig(
        vm_id=vm_id,
        kernel_path=str(probe_kernel_path(behaviour, touch_mib=touch)),
        rootfs_path=None,
        memory_mb=memory_mb,
        boot_args=PROBE_BOOT_ARGS,
        require_sandbox=True,
        jailer=JailerConfig(**jailer) if jailer else None,  # type: ignore[arg-type]
    )


async def test_guest_over_memory_limit_is_reported_as_oom(vm_id: str, chroot_base: Path) -> None:
    """Guest memory larger than the VMM's limit: touching it gets the VMM OOM-killed."""
    kernel = probe_kernel_path(ProbeBehaviour.RESET, touch_mib=300)
    proc = await start_with_jailer(
        JailerConfig(jailer_id=vm_id, memory_limit_mb=160),
        files=[JailFile(kernel, KERNEL)],
    )
    try:
        await proc.api.put_machine_config(1, 512)
        await proc.api.put_boot_source(KERNEL, PROBE_BOOT_ARGS)
        await proc.api.instance_start()
        proc.booted = True
        # The FirecrackerProcess handle turns the kill into OutOfMemoryError, not a crash.
        vm = FirecrackerProcess(
            VmConfig(vm_id=vm_id, kernel_path=str(kernel), rootfs_path=None), proc
        )
        with pytest.raises(OutOfMemoryError) as info:
            await vm.wait()
        assert info.value.exit_code == -9
        assert "OOM-killed" in str(info.value) and "160 MiB" in str(info.value)
        assert proc.oom_killed
        assert "TOUCHED" not in proc.console_path.read_text()
    finally:
        await proc.stop()


async def test_same_guest_under_larger_limit_completes(vm_id: str, chroot_base: Path) -> None:
    vm = await start_firecracker(probe_vm(vm_id, ProbeBehaviour.RESET, memory_mb=512, touch=300))
    try:
        await vm.start_instance()
        assert await vm.wait() == 0
        assert "IRONCLAW-PROBE-TOUCHED 300" in vm.console_path.read_text()
        assert not vm.oom_killed
    finally:
        await vm.stop()


async def test_half_cpu_quota_throttles_a_spinning_guest(vm_id: str, chroot_base: Path) -> None:
    vm = await start_firecracker(probe_vm(vm_id, ProbeBehaviour.SPIN, cpu_limit=0.5))
    try:
        await vm.start_instance()
        await wait_console(vm, READY_LINE)
        first = await vm.stats()
        await asyncio.sleep(1.0)
        second = await vm.stats()
        assert first.cpu_usage_ns is not None and second.cpu_usage_ns is not None
        assert second.cpu_usage_ns > first.cpu_usage_ns  # stats change while it runs
        assert second.nr_throttled is not None and second.nr_throttled > 0
        assert second.throttled_ns is not None and second.throttled_ns > 0
        # Usage over the window stays near the half-CPU quota (well under one full CPU).
        used = (second.cpu_usage_ns - first.cpu_usage_ns) / 1e9
        assert used < 0.8
        assert second.memory_current_bytes is not None and second.memory_current_bytes > 0
        assert second.pids_current is None or second.pids_current >= 1
    finally:
        await vm.stop()


async def test_pinning_places_vmm_threads_on_chosen_cpu(vm_id: str, chroot_base: Path) -> None:
    if (os.cpu_count() or 1) < 2:
        pytest.skip("pinning needs at least two CPUs to be observable")
    vm = await start_firecracker(probe_vm(vm_id, ProbeBehaviour.SPIN, cpuset_cpus="1"))
    try:
        await vm.start_instance()
        await wait_console(vm, READY_LINE)
        tasks = Path(f"/proc/{vm.pid}/task")
        allowed = set()
        for task in tasks.iterdir():
            for line in (task / "status").read_text().splitlines():
                if line.startswith("Cpus_allowed_list:"):
                    allowed.add(line.split(":", 1)[1].strip())
        assert allowed == {"1"}
        assert os.sched_getaffinity(vm.pid) == {1}
    finally:
        await vm.stop()


async def test_stats_fields_absent_not_zero_for_unconfigured_controllers(
    vm_id: str, chroot_base: Path
) -> None:
    vm = await start_firecracker(probe_vm(vm_id, ProbeBehaviour.HALT))
    try:
        stats = await vm.stats()
        assert stats.memory_current_bytes is not None
        assert stats.pids_current is None  # no pids limit -> no pids cgroup -> absent
    finally:
        await vm.stop()


async def test_cgroup_v2_requested_on_a_host_without_v2_controllers(
    vm_id: str, chroot_base: Path
) -> None:
    controllers = Path("/sys/fs/cgroup/unified/cgroup.controllers")
    if not controllers.exists() or "memory" in controllers.read_text().split():
        pytest.skip("needs this host's hybrid layout: cgroup2 mounted without memory/cpu")
    with pytest.raises(CgroupControllerUnavailableError) as info:
        await start_firecracker(probe_vm(vm_id, ProbeBehaviour.HALT, cgroup_version=2))
    text = str(info.value)
    assert "unavailable" in text and "cgroup_version=1" in text
