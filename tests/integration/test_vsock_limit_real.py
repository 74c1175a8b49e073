"""The per-VM vsock rate limit through a real, jailed Firecracker and the C vsock test guest.

Bytes go host -> Firecracker -> guest and back (the guest's ``echo``), through
``vm.connect_vsock``, which meters them with the VM's ``vsock_rate_limit``; the measured rate
must be within 10% of the limit. The limit is set far below what this guest sustains
unthrottled (about 750 KB/s on the build machine, against 128 KiB/s), so the limiter, not the
guest, sets the pace. Skips while the tree has no vsock
test guest (``ironclaw_orchestrator.agent.guest``).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from ironclaw_orchestrator.errors import HostError
from ironclaw_orchestrator.vm import VmConfig, VsockRateLimit, start_firecracker
from ironclaw_orchestrator.vm.probe import PROBE_BOOT_ARGS

pytestmark = pytest.mark.integration

guest: Any = pytest.importorskip(
    "ironclaw_orchestrator.agent.guest", reason="no vsock test guest in this tree yet"
)
agent_client: Any = pytest.importorskip("ironclaw_orchestrator.agent.client")

LIMIT = 128 << 10  # bytes/s, both directions together
BURST = 16 << 10
PAYLOAD = 192 << 10  # echoed: 2 x PAYLOAD cross the limiter (~3 s)


@pytest.fixture(scope="module")
def guest_kernel() -> Path:
    try:
        return Path(guest.build_vsock_guest())
    except HostError as exc:
        pytest.skip(f"cannot build the vsock test guest: {exc}")


async def test_echo_through_a_real_vm_is_limited(
    vm_id: str, chroot_base: Path, guest_kernel: Path
) -> None:
    vm = await start_firecracker(
        VmConfig(
            vm_id=vm_id,
            kernel_path=str(guest_kernel),
            rootfs_path=None,
            memory_mb=128,
            boot_args=PROBE_BOOT_ARGS,
            vsock_guest_cid=3,
            vsock_rate_limit=VsockRateLimit(bytes_per_s=LIMIT, bytes_burst=BURST),
            require_sandbox=True,
        )
    )
    try:
        await vm.start_instance()
        await vm.wait_agent(timeout_s=120)  # its own (unmetered) connection

        async def metered() -> Any:
            return await vm.connect_vsock(5252)

        client = agent_client.AgentClient(metered, where="metered vsock", io_timeout_s=120)
        try:
            await client.echo(b"warm-up", digest=False)  # handshake + first connection
            await _drained(vm)
            data = os.urandom(PAYLOAD)
            start = time.monotonic()
            back = await client.echo(data, digest=False)
            elapsed = time.monotonic() - start
        finally:
            await client.close()
        assert back == data
        rate = (2 * PAYLOAD - BURST) / elapsed
        assert 0.9 * LIMIT <= rate <= 1.1 * LIMIT, f"{rate:.0f} B/s vs limit {LIMIT} B/s"
    finally:
        await vm.stop()


async def _drained(vm: Any) -> None:
    """Wait until the byte bucket is full again, so the measurement starts from BURST."""
    bucket = vm.vsock_limiter.bytes
    await asyncio.sleep(bucket.take(0) + BURST / LIMIT)
