"""Firecracker's drive rate limiter doing its job, with a guest that reads its disk flat out.

``tests/guests/blk_reader.c`` reads its virtio-blk disk in a loop as fast as the device
allows (hundreds of MB/s here unthrottled) and prints one ``*`` per 64 KiB read. With a
bandwidth limit the guest must be held to it (within 10%), Firecracker's metrics must show
the limiter throttling, after ``vm.update_rate_limits`` (PATCH) the new limit must hold, and
without a limit the guest must run free again.

The rate is counted from the console, not from Firecracker's metrics: on v1.0 here, an API
request right after ``FlushMetrics`` under heavy block I/O can hang (the VMM thread never
picks it up), so metrics are flushed once, at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

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


CHUNK = 64 << 10  # bytes per '*'


async def read_rate(vm: FirecrackerProcess, seconds: float, settle: float = 1.0) -> float:
    """Bytes per second the guest read over ``seconds``, counted from its console."""
    await asyncio.sleep(settle)  # let a new bucket's initial full load drain first
    before, start = vm.console_path.read_bytes().count(b"*"), time.monotonic()
    await asyncio.sleep(seconds)
    after, end = vm.console_path.read_bytes().count(b"*"), time.monotonic()
    return (after - before) * CHUNK / (end - start)


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

        first = await read_rate(vm, 3.0)
        assert 0.9 * MIB <= first <= 1.1 * MIB, first

        await vm.update_rate_limits(drive=limit(2 * MIB))
        second = await read_rate(vm, 3.0)
        assert 1.8 * MIB <= second <= 2.2 * MIB, second

        await vm.update_rate_limits(drive=RateLimit())
        # No limiter left: in its best half second (a busy host may stall it for a moment)
        # the guest reads far more than any limit it had.
        free = max([await read_rate(vm, 0.5, settle=0.0) for _ in range(4)])
        assert free > 8 * MIB, free
        assert vm.vmm.returncode is None, vm.console_tail()

        await vm.api.flush_metrics()  # the last API call: see the module docstring
        lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        assert sum(x["block"]["rate_limiter_throttled_events"] for x in lines) > 0
    finally:
        await vm.stop()
