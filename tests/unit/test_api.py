"""The API client against an in-process fake Firecracker on a Unix socket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ironclaw_orchestrator.errors import ApiError
from ironclaw_orchestrator.vm.api import FirecrackerApi
from ironclaw_orchestrator.vm.ratelimit import RateLimit, TokenBucket

Request = tuple[str, str, dict[str, object] | None]


class FakeState:
    connections = 0
    close_after_each = False  # answer with Connection: close, then hang up
    stall_path: str | None = None  # never answer this path


@pytest.fixture
def state() -> FakeState:
    return FakeState()


@pytest.fixture
async def fake_fc(tmp_path: Path, state: FakeState) -> AsyncIterator[tuple[Path, list[Request]]]:
    seen: list[Request] = []
    sock = tmp_path / "fc.sock"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        while True:
            head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
            if not head:
                break
            lines = head.decode().split("\r\n")
            method, path, _ = lines[0].split(" ")
            length = next(
                (int(h.split(":")[1]) for h in lines if h.lower().startswith("content-length")), 0
            )
            body = json.loads(await reader.readexactly(length)) if length else None
            seen.append((method, path, body))
            if path == state.stall_path:
                await reader.read()  # never answer; return once the client hangs up
                break
            if path == "/machine-config" and body and body.get("vcpu_count") == 99:
                payload = b'{"fault_message": "Invalid vCPU count"}'
                status = b"400 Bad Request"
            elif path == "/":
                payload = b'{"id": "anonymous-instance", "state": "Not started"}'
                status = b"200 OK"
            else:
                payload, status = b"", b"204 No Content"
            close = b"Connection: close\r\n" if state.close_after_each else b""
            writer.write(
                b"HTTP/1.1 " + status + b"\r\n" + close + b"Content-Length: "
                + str(len(payload)).encode() + b"\r\n\r\n" + payload
            )  # fmt: skip
            await writer.drain()
            if close:
                break
        writer.close()

    server = await asyncio.start_unix_server(handle, path=str(sock))
    async with server:
        yield sock, seen


async def test_configure_calls_and_bodies(fake_fc: tuple[Path, list[Request]]) -> None:
    sock, seen = fake_fc
    async with FirecrackerApi(sock, vm_id="t") as api:
        assert (await api.describe())["state"] == "Not started"
        await api.put_machine_config(2, 256)
        await api.put_boot_source(Path("/vmlinux"), "console=ttyS0")
        await api.put_drive("rootfs", Path("/rootfs.ext4"), root=True, read_only=False)
        await api.instance_start()
    assert seen[1] == ("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256})
    assert seen[3][2] == {
        "drive_id": "rootfs",
        "path_on_host": "/rootfs.ext4",
        "is_root_device": True,
        "is_read_only": False,
    }
    assert seen[4] == ("PUT", "/actions", {"action_type": "InstanceStart"})


async def test_machine_config_with_dirty_page_tracking(
    fake_fc: tuple[Path, list[Request]],
) -> None:
    sock, seen = fake_fc
    async with FirecrackerApi(sock, vm_id="t") as api:
        await api.put_machine_config(1, 128, track_dirty_pages=True)
    assert seen[-1] == (
        "PUT",
        "/machine-config",
        {"vcpu_count": 1, "mem_size_mib": 128, "track_dirty_pages": True},
    )


async def test_fault_message_is_translated(fake_fc: tuple[Path, list[Request]]) -> None:
    sock, _ = fake_fc
    async with FirecrackerApi(sock, vm_id="vm-7") as api:
        with pytest.raises(ApiError) as info:
            await api.put_machine_config(99, 128)
    assert info.value.status_code == 400
    assert info.value.fault_message == "Invalid vCPU count"
    assert "vm-7" in str(info.value) and "/machine-config" in str(info.value)


async def test_missing_socket_is_api_error(tmp_path: Path) -> None:
    async with FirecrackerApi(tmp_path / "none.sock", vm_id="t") as api:
        with pytest.raises(ApiError, match="cannot reach the API socket"):
            await api.describe()


async def test_one_keep_alive_connection_per_client(
    fake_fc: tuple[Path, list[Request]], state: FakeState
) -> None:
    sock, seen = fake_fc
    async with FirecrackerApi(sock, vm_id="t") as api:
        for _ in range(5):
            await api.describe()
        await asyncio.gather(api.describe(), api.describe(), api.instance_start())
    assert len(seen) == 8
    assert state.connections == 1


async def test_reconnects_when_the_server_closes(
    fake_fc: tuple[Path, list[Request]], state: FakeState
) -> None:
    sock, seen = fake_fc
    state.close_after_each = True
    async with FirecrackerApi(sock, vm_id="t") as api:
        for _ in range(3):
            assert (await api.describe())["id"] == "anonymous-instance"
    assert len(seen) == 3
    assert state.connections == 3


async def test_timeout_drops_the_connection_and_the_next_call_works(
    fake_fc: tuple[Path, list[Request]], state: FakeState
) -> None:
    sock, _ = fake_fc
    state.stall_path = "/actions"
    async with FirecrackerApi(sock, vm_id="vm-9") as api:
        with pytest.raises(ApiError, match="vm-9: PUT /actions timed out"):
            await api.request("PUT", "/actions", {"action_type": "InstanceStart"}, timeout_s=0.2)
        assert (await api.describe())["state"] == "Not started"
    assert state.connections == 2


async def test_rate_limit_bodies_golden(fake_fc: tuple[Path, list[Request]]) -> None:
    # The RateLimiter object is the same in v1.0 (checked against the real binary by the
    # integration tests) and v1.14's swagger: {bandwidth, ops} of {size, one_time_burst,
    # refill_time (ms)}; PATCH bodies carry only the id and the limiters.
    sock, seen = fake_fc
    bw = TokenBucket(size=1 << 20, refill_time_ms=1000, one_time_burst=1 << 22)
    ops = TokenBucket(size=100, refill_time_ms=500)
    async with FirecrackerApi(sock, vm_id="t") as api:
        await api.put_drive("rootfs", Path("/rootfs.ext4"), root=True, read_only=True,
                            rate_limit=RateLimit(bandwidth=bw, ops=ops))  # fmt: skip
        await api.put_network_interface("eth0", "ic-tap", "06:00:ac:10:00:02",
                                        rx_rate_limit=RateLimit(ops=ops))  # fmt: skip
        await api.patch_drive_rate_limit("rootfs", RateLimit(bandwidth=bw))
        await api.patch_network_rate_limits("eth0", tx=RateLimit())
        await api.flush_metrics()
    bw_body = {"size": 1048576, "refill_time": 1000, "one_time_burst": 4194304}
    ops_body = {"size": 100, "refill_time": 500}
    off = {"size": 0, "refill_time": 0}
    assert seen == [
        ("PUT", "/drives/rootfs", {
            "drive_id": "rootfs", "path_on_host": "/rootfs.ext4", "is_root_device": True,
            "is_read_only": True, "rate_limiter": {"bandwidth": bw_body, "ops": ops_body},
        }),
        ("PUT", "/network-interfaces/eth0", {
            "iface_id": "eth0", "host_dev_name": "ic-tap", "guest_mac": "06:00:ac:10:00:02",
            "rx_rate_limiter": {"ops": ops_body},
        }),
        ("PATCH", "/drives/rootfs", {
            "drive_id": "rootfs", "rate_limiter": {"bandwidth": bw_body, "ops": off},
        }),
        ("PATCH", "/network-interfaces/eth0", {
            "iface_id": "eth0", "tx_rate_limiter": {"bandwidth": off, "ops": off},
        }),
        ("PUT", "/actions", {"action_type": "FlushMetrics"}),
    ]  # fmt: skip
