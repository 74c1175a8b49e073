"""Firecracker's network tx rate limiter, with a guest that transmits flat out.

``tests/guests/net_sender.c`` sends 1514-byte Ethernet frames on its virtio-net device (the
tap in the VM's own network namespace) as fast as the device takes them and prints one
``*`` per frame; the host counts them. Bandwidth and packet-rate limits must hold within
10%, follow ``vm.update_rate_limits`` (PATCH /network-interfaces), and go away when removed.
"""

from __future__ import annotations

import asyncio
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
from ironclaw_orchestrator.vm.probe import PROBE_BOOT_ARGS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from guests import build_guest

pytestmark = pytest.mark.integration

MIB = 1 << 20
#: What the limiter charges per frame: the 12-byte virtio-net header plus the frame.
CHAIN = 12 + 1514
READY = "IRONCLAW-NET-SENDER READY"


@pytest.fixture(scope="module")
def sender_kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_guest("net_sender", tmp_path_factory.mktemp("guest"))


def bandwidth(bytes_per_s: int) -> RateLimit:
    return RateLimit(bandwidth=TokenBucket(size=bytes_per_s, refill_time_ms=1000))


async def frames_per_s(vm: FirecrackerProcess, seconds: float, settle: float = 1.0) -> float:
    """Frames per second the guest sent over ``seconds``, counted from its console."""
    await asyncio.sleep(settle)  # let a new bucket's initial full load drain first
    before, start = vm.console_path.read_bytes().count(b"*"), time.monotonic()
    await asyncio.sleep(seconds)
    after, end = vm.console_path.read_bytes().count(b"*"), time.monotonic()
    return (after - before) / (end - start)


async def test_net_tx_limits_hold_and_follow_patch(
    vm_id: str, chroot_base: Path, sender_kernel: Path
) -> None:
    vm = await start_firecracker(
        VmConfig(
            vm_id=vm_id,
            kernel_path=str(sender_kernel),
            rootfs_path=None,
            memory_mb=128,
            boot_args=PROBE_BOOT_ARGS,
            enable_networking=True,
            net_tx_rate_limit=bandwidth(1 * MIB),
            require_sandbox=True,
            # The vCPU spins while it polls: keep a CPU of quota for the VMM thread.
            jailer=JailerConfig(cpu_limit=2.0),
        )
    )
    try:
        await vm.start_instance()
        for _ in range(400):
            if READY in vm.console_tail():
                break
            await asyncio.sleep(0.05)
        assert READY in vm.console_tail(), vm.console_tail()

        rate = await frames_per_s(vm, 3.0) * CHAIN
        assert 0.9 * MIB <= rate <= 1.1 * MIB, rate

        await vm.update_rate_limits(net_tx=bandwidth(2 * MIB))
        rate = await frames_per_s(vm, 3.0) * CHAIN
        assert 1.8 * MIB <= rate <= 2.2 * MIB, rate

        await vm.update_rate_limits(
            net_tx=RateLimit(ops=TokenBucket(size=200, refill_time_ms=1000))
        )
        pps = await frames_per_s(vm, 3.0)
        assert 180 <= pps <= 220, pps

        await vm.update_rate_limits(net_tx=RateLimit())
        free = max([await frames_per_s(vm, 0.5, settle=0.0) for _ in range(4)]) * CHAIN
        assert free > 8 * MIB, free
        assert vm.vmm.returncode is None, vm.console_tail()
    finally:
        await vm.stop()
