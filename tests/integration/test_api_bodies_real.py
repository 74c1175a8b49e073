"""The request bodies the API client builds, sent to the real firecracker on this machine.

The unit test ``test_fc_schemas`` checks every body against models written from each
release's published API specification; this one proves the models' premises on a real
binary: firecracker (v1.0.0 here) accepts what the client sends, in particular ``PUT /vsock``
without the deprecated ``vsock_id``, and rejects an unknown field the way the models do.

Firecracker runs unjailed on a socket in a temporary directory and is never booted (the
calls are the pre-boot configuration), so no guest kernel is needed.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ironclaw_orchestrator.errors import ApiError, IronclawError
from ironclaw_orchestrator.vm import api_calls
from ironclaw_orchestrator.vm.api import FirecrackerApi
from ironclaw_orchestrator.vm.ratelimit import RateLimit, TokenBucket

pytestmark = pytest.mark.integration

READY_TIMEOUT_S = 30.0


def _firecracker() -> Path:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is missing or not read/writable")
    from ironclaw_orchestrator.vm.binaries import find_firecracker

    try:
        return find_firecracker()
    except IronclawError as exc:
        pytest.skip(f"no firecracker binary on this machine: {exc}")


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[FirecrackerApi]:
    socket = tmp_path / "api.sock"
    log = (tmp_path / "console.log").open("wb")
    proc = subprocess.Popen(
        [str(_firecracker()), "--api-sock", str(socket)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    client = FirecrackerApi(socket, vm_id="api-bodies")
    try:
        deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_S
        while True:
            assert proc.poll() is None, (tmp_path / "console.log").read_text()
            try:
                if socket.exists():
                    await client.describe(timeout_s=1.0)
                    break
            except ApiError:
                pass
            assert asyncio.get_running_loop().time() < deadline, "firecracker API not ready"
            await asyncio.sleep(0.01)
        yield client
    finally:
        await client.aclose()
        proc.kill()
        proc.wait(timeout=30)
        log.close()


async def test_preboot_bodies_are_accepted(api: FirecrackerApi, tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF not booted")
    rootfs = tmp_path / "rootfs.ext4"
    rootfs.write_bytes(b"\0" * 4096)
    metrics = tmp_path / "metrics.json"
    metrics.touch()  # up to v1.13 the file must exist
    limit = RateLimit(
        bandwidth=TokenBucket(size=1 << 20, refill_time_ms=1000, one_time_burst=1 << 22),
        ops=TokenBucket(size=100, refill_time_ms=100),
    )

    await api.put_machine_config(1, 64)
    await api.put_boot_source(kernel, "console=ttyS0 reboot=k panic=1 pci=off")
    await api.put_drive("rootfs", rootfs, root=True, read_only=True, rate_limit=limit)
    await api.put_vsock(3, tmp_path / "v.sock")
    await api.put_metrics(metrics)

    config = await api.get_vm_config()
    assert config["machine-config"]["vcpu_count"] == 1
    assert config["machine-config"]["mem_size_mib"] == 64
    assert config["boot-source"]["kernel_image_path"] == str(kernel)
    assert [d["drive_id"] for d in config["drives"]] == ["rootfs"]
    assert config["drives"][0]["rate_limiter"]["bandwidth"]["size"] == 1 << 20
    assert config["vsock"]["guest_cid"] == 3
    assert config["vsock"]["uds_path"] == str(tmp_path / "v.sock")


async def test_unknown_field_is_rejected_like_the_models_do(
    api: FirecrackerApi, tmp_path: Path
) -> None:
    with pytest.raises(ApiError) as excinfo:
        await api.request(
            "PUT", "/vsock", {"guest_cid": 3, "uds_path": str(tmp_path / "v"), "bogus": 1}
        )
    assert excinfo.value.status_code == 400
    assert "unknown field `bogus`" in str(excinfo.value)


async def test_pipelined_requests_are_served_in_order(api: FirecrackerApi, tmp_path: Path) -> None:
    """A start sends its configuration pipelined (one write): the real server answers each
    request in order, a rejected one included, and keeps the connection."""
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF not booted")
    rootfs = tmp_path / "rootfs.ext4"
    rootfs.write_bytes(b"\0" * 4096)
    requests = [
        api_calls.machine_config(2, 96),
        api_calls.boot_source(kernel, "console=ttyS0"),
        api_calls.drive("rootfs", rootfs, root=True, read_only=True),
        api_calls.vsock(5, tmp_path / "v.sock"),
        ("GET", "/vm/config", None),
    ]
    results = await api.request_all(requests)
    assert results[:4] == [None] * 4
    assert results[4]["machine-config"]["vcpu_count"] == 2
    assert results[4]["vsock"]["guest_cid"] == 5
    with pytest.raises(ApiError, match="rejected PUT /boot-source") as info:
        await api.request_all([
            api_calls.machine_config(1, 64),
            api_calls.boot_source(tmp_path / "missing", "console=ttyS0"),
            api_calls.drive("scratch", rootfs, root=False, read_only=True),
        ])  # fmt: skip
    assert info.value.status_code == 400
    config = await api.get_vm_config()  # the requests around the rejected one were served
    assert config["machine-config"]["mem_size_mib"] == 64
    assert [d["drive_id"] for d in config["drives"]] == ["rootfs", "scratch"]
