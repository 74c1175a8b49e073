"""The API client against an in-process fake Firecracker on a Unix socket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ironclaw_orchestrator.errors import ApiError
from ironclaw_orchestrator.vm.api import FirecrackerApi

Request = tuple[str, str, dict[str, object] | None]


@pytest.fixture
async def fake_fc(tmp_path: Path) -> AsyncIterator[tuple[Path, list[Request]]]:
    seen: list[Request] = []
    sock = tmp_path / "fc.sock"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
            if path == "/machine-config" and body and body.get("vcpu_count") == 99:
                payload = b'{"fault_message": "Invalid vCPU count"}'
                status = b"400 Bad Request"
            elif path == "/":
                payload = b'{"id": "anonymous-instance", "state": "Not started"}'
                status = b"200 OK"
            else:
                payload, status = b"", b"204 No Content"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Length: "
                + str(len(payload)).encode() + b"\r\n\r\n" + payload
            )  # fmt: skip
            await writer.drain()
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
