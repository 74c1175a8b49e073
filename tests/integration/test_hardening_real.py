"""Rate limits and seccomp with the real jailer + firecracker (v1.0.0 on the build machine).

Proof from Firecracker itself: ``GET /vm/config`` (present since v1.0) reports the limiters it
holds, before and after a ``PATCH``, and its metrics count the live updates. The probe guest
does no disk or network I/O, so throttling *events* cannot be provoked here.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
from pathlib import Path
from typing import Any

import pytest

from ironclaw_orchestrator.errors import ApiError, ConfigError, SandboxRequiredError
from ironclaw_orchestrator.lsm import detect_lsms
from ironclaw_orchestrator.vm import JailerConfig, VmConfig, start_firecracker
from ironclaw_orchestrator.vm.jailer import JailerProcess
from ironclaw_orchestrator.vm.probe import PROBE_BOOT_ARGS, ProbeBehaviour, probe_kernel_path
from ironclaw_orchestrator.vm.ratelimit import RateLimit, TokenBucket

pytestmark = pytest.mark.integration


def cfg(vm_id: str, *, jailer: JailerConfig | None = None, **kw: Any) -> VmConfig:
    kw.setdefault("require_sandbox", True)
    kw.setdefault("rootfs_path", None)
    if jailer is not None:
        kw["jailer"] = jailer
    return VmConfig(
        vm_id=vm_id,
        kernel_path=str(probe_kernel_path(ProbeBehaviour.HALT)),
        memory_mb=128,
        boot_args=PROBE_BOOT_ARGS,
        **kw,
    )


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(b"\0" * (1 << 20))
    return path


def drive_limiter(config: dict[str, Any]) -> Any:
    return config["drives"][0]["rate_limiter"]


async def test_drive_and_net_limits_applied_and_patched(
    vm_id: str, chroot_base: Path, disk: Path
) -> None:
    bw = TokenBucket(size=1 << 20, refill_time_ms=1000, one_time_burst=4 << 20)
    ops = TokenBucket(size=100, refill_time_ms=1000)
    vm = await start_firecracker(
        cfg(
            vm_id,
            rootfs_path=str(disk),
            enable_networking=True,
            drive_rate_limit=RateLimit(bandwidth=bw, ops=ops),
            net_rx_rate_limit=RateLimit(bandwidth=bw),
            net_tx_rate_limit=RateLimit(ops=ops),
        )
    )
    try:
        assert isinstance(vm.vmm, JailerProcess)
        # Metrics file: must exist (owned by the jail user) before PUT /metrics on v1.0.
        metrics = vm.vmm.jail_host_path("/metrics.json")
        metrics.touch(mode=0o600)
        os.chown(metrics, vm.vmm.config.uid, vm.vmm.config.gid)
        await vm.api.put_metrics(Path("/metrics.json"))

        before = await vm.api.get_vm_config()
        assert drive_limiter(before) == {
            "bandwidth": {"size": 1 << 20, "one_time_burst": 4 << 20, "refill_time": 1000},
            "ops": {"size": 100, "one_time_burst": None, "refill_time": 1000},
        }
        iface = before["network-interfaces"][0]
        assert iface["rx_rate_limiter"]["bandwidth"]["size"] == 1 << 20
        assert iface["rx_rate_limiter"]["ops"] is None
        assert iface["tx_rate_limiter"]["ops"]["size"] == 100

        await vm.start_instance()
        new = TokenBucket(size=2 << 20, refill_time_ms=500)
        await vm.update_rate_limits(
            drive=RateLimit(bandwidth=new), net_rx=RateLimit(), net_tx=RateLimit(bandwidth=new)
        )
        after = await vm.api.get_vm_config()
        assert drive_limiter(after) == {
            "bandwidth": {"size": 2 << 20, "one_time_burst": None, "refill_time": 500},
            "ops": None,  # replaced: the ops bucket was disabled
        }
        iface = after["network-interfaces"][0]
        assert iface["rx_rate_limiter"] in (None, {"bandwidth": None, "ops": None})
        assert iface["tx_rate_limiter"]["bandwidth"]["size"] == 2 << 20

        await vm.api.flush_metrics()
        lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]

        # Counters are deltas since the previous flush (firecracker also flushes by itself).
        def total(group: str, key: str) -> int:
            return sum(line[group][key] for line in lines)

        assert total("patch_api_requests", "drive_count") == 1
        assert total("patch_api_requests", "network_count") == 1
        assert total("patch_api_requests", "drive_fails") == 0
        assert total("patch_api_requests", "network_fails") == 0
        # The counters a throttled guest would move (this guest does no I/O).
        assert lines[-1]["block"]["rate_limiter_throttled_events"] == 0
    finally:
        await vm.stop()


async def test_seccomp_filtered_on_every_thread_and_in_stats(vm_id: str, chroot_base: Path) -> None:
    vm = await start_firecracker(cfg(vm_id))
    try:
        await vm.start_instance()  # checks every thread, vCPUs included
        status = vm.seccomp_status()
        assert status.filtered and len(status.threads) >= 3, status
        stats = await vm.stats()
        assert stats.seccomp_mode == 2 and stats.seccomp_threads == len(status.threads)
    finally:
        await vm.stop()


async def test_no_seccomp_is_visible_and_refused_in_production(
    vm_id: str, chroot_base: Path
) -> None:
    with pytest.raises(ConfigError, match="production mode"):
        await start_firecracker(cfg(vm_id, jailer=JailerConfig(no_seccomp=True)))
    vm = await start_firecracker(
        cfg(vm_id, require_sandbox=False, jailer=JailerConfig(no_seccomp=True)),
        use_jailer=True,
    )
    try:
        await vm.start_instance()
        assert vm.seccomp_status().mode == 0
        assert (await vm.stats()).seccomp_mode == 0
    finally:
        await vm.stop()


def bpf_thread_map(programs: dict[str, list[tuple[int, int, int, int]]]) -> bytes:
    """Firecracker's compiled filter file (what seccompiler-bin writes): a bincode
    ``HashMap<String, Vec<sock_filter>>`` with fixed-width little-endian integers."""
    out = struct.pack("<Q", len(programs))
    for name, prog in programs.items():
        out += struct.pack("<Q", len(name)) + name.encode()
        out += struct.pack("<Q", len(prog))
        for code, jt, jf, k in prog:
            out += struct.pack("<HBBI", code, jt, jf, k)
    return out


RET_ALLOW = (0x06, 0, 0, 0x7FFF0000)
RET_KILL_PROCESS = (0x06, 0, 0, 0x80000000)


async def test_custom_seccomp_filter_is_staged_and_enforced(
    vm_id: str, chroot_base: Path, tmp_path: Path
) -> None:
    allow = tmp_path / "allow.bpf"
    allow.write_bytes(bpf_thread_map({"vmm": [RET_ALLOW], "api": [RET_ALLOW], "vcpu": [RET_ALLOW]}))
    vm = await start_firecracker(cfg(vm_id, jailer=JailerConfig(seccomp_filter=allow)))
    try:
        assert isinstance(vm.vmm, JailerProcess)
        assert "--seccomp-filter" in vm.vmm.argv
        assert vm.vmm.jail_host_path("/seccomp-filter.bpf").read_bytes() == allow.read_bytes()
        await vm.start_instance()
        assert vm.seccomp_status().filtered
    finally:
        await vm.stop()

    # A filter that kills any vCPU thread's first system call: the VM dies at boot,
    # which proves firecracker runs under *our* filter, not its built-in one.
    kill = tmp_path / "kill.bpf"
    kill.write_bytes(
        bpf_thread_map({"vmm": [RET_ALLOW], "api": [RET_ALLOW], "vcpu": [RET_KILL_PROCESS]})
    )
    vm = await start_firecracker(cfg(vm_id, jailer=JailerConfig(seccomp_filter=kill)))
    try:
        with pytest.raises(ApiError, match=r"PUT /actions"):
            await vm.start_instance()
        code = await asyncio.wait_for(vm.vmm.wait(), 20)
        assert code == -signal.SIGSYS  # killed by the filter
    finally:
        await vm.stop()


async def test_requested_lsm_refused_where_inactive(vm_id: str, chroot_base: Path) -> None:
    state = detect_lsms()
    if state.apparmor or state.selinux:
        pytest.skip(f"this host has an active LSM ({state.summary()})")
    for jailer in (
        JailerConfig(apparmor_profile=f"ironclaw-{vm_id}"),
        JailerConfig(selinux_label="system_u:system_r:ironclaw_jailer_t:s0"),
    ):
        with pytest.raises(SandboxRequiredError, match="not active on this host"):
            await start_firecracker(cfg(vm_id, jailer=jailer))
    # (the vm_id fixture asserts nothing was made: no jail, cgroup, netns or process)
