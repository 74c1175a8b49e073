"""Firecracker's drive rate limiter doing its job, with a guest that reads its disk flat out.

``tests/guests/blk_reader.c`` reads its virtio-blk disk in a loop as fast as the device
allows (several hundred MB/s here unthrottled). With a bandwidth limit, Firecracker's own
metrics must show the guest held to it (read bytes per second within 10%) and the limiter
throttling; after ``vm.update_rate_limits`` (PATCH) the new limit holds, and removing the
limit lets the guest run free again.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ironclaw_orchestrator.vm import (
    FirecrackerProcess,
    JailerConfig,
    RateLimit,
    TokenBucket,
    VmConfig,
    start_firecracker,
)
from ironclaw_orchestrator.vm.jailer import JailerProcess
from ironclaw_orchestrator.vm.probe import PROBE_BOOT_ARGS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from guests import build_guest

pytestmark = pytest.mark.integration

MIB = 1 << 20
READY = "IRONCLAW-BLK-READER READY"


@pytest.fixture(scope="module")
def reader_kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_guest("blk_reader", tmp_path_factory.mktemp("guest"))


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(8 * MIB))
    path.chmod(0o644)
    return path


def limit(bytes_per_s: int) -> RateLimit:
    return RateLimit(bandwidth=TokenBucket(size=bytes_per_s, refill_time_ms=1000))


async def read_rate(vm: FirecrackerProcess, metrics: Path, seconds: float) -> dict[str, Any]:
    """Block metrics over ``seconds`` (firecracker's counters are deltas per flush)."""
    await asyncio.sleep(1.0)  # let the bucket's initial full load drain first
    await vm.api.flush_metrics()
    start = time.monotonic()
    await asyncio.sleep(seconds)
    await vm.api.flush_metrics()
    elapsed = time.monotonic() - start
    block: dict[str, Any] = json.loads(metrics.read_text().splitlines()[-1])["block"]
    return {**block, "rate": block["read_bytes"] / elapsed}


async def test_drive_bandwidth_limit_holds_and_follows_patch(
    vm_id: str, chroot_base: Path, reader_kernel: Path, disk: Path
) -> None:
    vm = await start_firecracker(
        VmConfig(
            vm_id=vm_id,
            kernel_path=str(reader_kernel),
            rootfs_path=str(disk),
            rootfs_read_only=True,
            memory_mb=128,
            boot_args=PROBE_BOOT_ARGS,
            drive_rate_limit=limit(1 * MIB),
            require_sandbox=True,
            # The vCPU spins while it polls; a whole CPU of quota besides it keeps the VMM
            # thread (which serves the API) from being starved on a busy host.
            jailer=JailerConfig(cpu_limit=2.0),
        )
    )
    try:
        assert isinstance(vm.vmm, JailerProcess)
        metrics = vm.vmm.jail_host_path("/metrics.json")
        metrics.touch(mode=0o600)
        os.chown(metrics, vm.vmm.config.uid, vm.vmm.config.gid)
        await vm.api.put_metrics(Path("/metrics.json"))
        await vm.start_instance()
        for _ in range(400):
            if READY in vm.console_tail():
                break
            await asyncio.sleep(0.05)
        assert READY in vm.console_tail(), vm.console_tail()

        first = await read_rate(vm, metrics, 3.0)
        assert 0.9 * MIB <= first["rate"] <= 1.1 * MIB, first
        assert first["rate_limiter_throttled_events"] > 0

        await vm.update_rate_limits(drive=limit(2 * MIB))
        second = await read_rate(vm, metrics, 3.0)
        assert 1.8 * MIB <= second["rate"] <= 2.2 * MIB, second

        await vm.update_rate_limits(drive=RateLimit())
        free = await read_rate(vm, metrics, 1.0)
        assert free["rate"] > 4 * MIB, free  # no limiter left
        assert vm.vmm.returncode is None, vm.console_tail()
    finally:
        await vm.stop()
