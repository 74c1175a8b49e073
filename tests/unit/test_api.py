"""The API client against an in-process fake Firecracker on a Unix socket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from ironclaw_orchestrator.errors import ApiError, UsageError
from ironclaw_orchestrator.vm.api import FirecrackerApi
from ironclaw_orchestrator.vm.lifecycle import wait_ready
from ironclaw_orchestrator.vm.process import ChildProcess
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


async def raw_server(
    tmp_path: Path, answer: Callable[[int, bytes], Awaitable[bytes | None]]
) -> tuple[asyncio.Server, Path, list[int]]:
    """A server that answers each request head with ``answer(connection_no, head)``'s bytes,
    written one byte at a time (``None``: hang up without answering)."""
    sock = tmp_path / "raw.sock"
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(len(connections) + 1)
        number = len(connections)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (int(line.split(b":")[1]) for line in head.split(b"\r\n")
                     if line.lower().startswith(b"content-length")), 0,
                )  # fmt: skip
                await reader.readexactly(length)
                reply = await answer(number, head)
                if reply is None:
                    break
                for i in range(len(reply)):
                    writer.write(reply[i : i + 1])
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_unix_server(handle, path=str(sock))
    return server, sock, connections


OK_200 = b'HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{"state": "up"}'


async def test_response_in_pieces_and_chunked(tmp_path: Path) -> None:
    chunked = (
        b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\n{"a": \r\n2\r\n1}\r\n0\r\n\r\n'
    )

    async def answer(_: int, head: bytes) -> bytes:
        return chunked if head.startswith(b"GET /chunked") else OK_200

    server, sock, connections = await raw_server(tmp_path, answer)
    async with server, FirecrackerApi(sock, vm_id="t") as api:
        assert await api.describe() == {"state": "up"}
        assert await api.request("GET", "/chunked") == {"a": 1}
        assert await api.describe() == {"state": "up"}
    assert connections == [1]


async def test_server_hanging_up_on_a_kept_connection_is_resent_once(tmp_path: Path) -> None:
    """Firecracker may close an idle keep-alive connection: the request goes again on a new
    one, once (a request the server never answered was never acted on)."""
    answered: list[int] = []

    async def answer(conn: int, _: bytes) -> bytes | None:
        if conn == 1 and answered:
            return None  # the first connection's second request: hang up, unanswered
        answered.append(conn)
        return OK_200

    server, sock, connections = await raw_server(tmp_path, answer)
    async with server, FirecrackerApi(sock, vm_id="t") as api:
        await api.describe()
        await api.describe()
    assert answered == [1, 2] and connections == [1, 2]


async def test_garbage_is_an_api_error_and_the_next_request_reconnects(tmp_path: Path) -> None:
    async def answer(conn: int, _: bytes) -> bytes:
        return b"NOT HTTP AT ALL\r\n\r\n" if conn == 1 else OK_200

    server, sock, connections = await raw_server(tmp_path, answer)
    async with server, FirecrackerApi(sock, vm_id="vm-g") as api:
        with pytest.raises(ApiError, match="vm-g: cannot reach the API socket"):
            await api.describe()
        assert await api.describe() == {"state": "up"}
    assert connections == [1, 2]


async def test_a_cancelled_request_never_hands_its_answer_to_the_next(tmp_path: Path) -> None:
    """A response still on its way when its request was cancelled must not be taken for the
    next request's: the connection is dropped."""
    release = asyncio.Event()

    async def answer(conn: int, head: bytes) -> bytes:
        if head.startswith(b"PUT /slow"):
            await release.wait()
            return b"HTTP/1.1 400 Bad\r\nContent-Length: 2\r\n\r\n{}"
        return OK_200

    server, sock, connections = await raw_server(tmp_path, answer)
    async with server, FirecrackerApi(sock, vm_id="t") as api:
        task = asyncio.ensure_future(api.request("PUT", "/slow", {}))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        assert await api.describe() == {"state": "up"}
    assert connections == [1, 2]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/ HTTP/1.1\r\nX: y"),
        ("GET", "/a b"),
        ("GET", "no-slash"),
        ("DELETE", "/"),
        ("GET", "/\u00e9"),
    ],
)
async def test_a_request_that_could_break_the_request_line_is_refused(
    tmp_path: Path, method: str, path: str
) -> None:
    async with FirecrackerApi(tmp_path / "none.sock", vm_id="t") as api:
        with pytest.raises(UsageError, match="not an API request"):
            await api.request(method, path)


async def test_request_all_pipelines_and_raises_the_first_rejection(
    fake_fc: tuple[Path, list[Request]], state: FakeState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pre-boot configuration goes in one write and comes back with one wake-up; the
    server answers each in order, and the first rejection is raised once all are answered."""
    sock, seen = fake_fc
    writes: list[bytes] = []
    async with FirecrackerApi(sock, vm_id="vm-p") as api:
        await api.describe()
        transport = api._link.transport  # type: ignore[union-attr]
        real_write = transport.write  # type: ignore[union-attr]
        monkeypatch.setattr(
            transport, "write", lambda data: (writes.append(data), real_write(data))
        )
        assert await api.request_all([
            ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128}),
            ("GET", "/", None),
            ("PUT", "/boot-source", {"kernel_image_path": "/vmlinux", "boot_args": ""}),
        ]) == [None, {"id": "anonymous-instance", "state": "Not started"}, None]  # fmt: skip
        assert len(writes) == 1
        with pytest.raises(ApiError, match="rejected PUT /machine-config") as info:
            await api.request_all([
                ("PUT", "/machine-config", {"vcpu_count": 99, "mem_size_mib": 128}),
                ("PUT", "/drives/rootfs", {"drive_id": "rootfs"}),
            ])  # fmt: skip
        assert info.value.status_code == 400
        assert seen[-1] == ("PUT", "/drives/rootfs", {"drive_id": "rootfs"})  # still served
        assert await api.request_all([]) == []
        assert (await api.describe())["state"] == "Not started"
    assert state.connections == 1


async def test_readiness_carries_the_configuration_and_a_rejection_is_final(
    fake_fc: tuple[Path, list[Request]], state: FakeState, tmp_path: Path
) -> None:
    """A jailed start sends its configuration pipelined with the GET / that finds the API
    ready; a request the live server rejects is raised at once, not retried as not-ready."""
    sock, seen = fake_fc
    proc = ChildProcess.spawn(["/bin/sleep", "30"], stdout_path=tmp_path / "out")
    good = [("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})]
    bad = [("PUT", "/machine-config", {"vcpu_count": 99, "mem_size_mib": 128})]
    try:
        async with FirecrackerApi(sock, vm_id="r") as api:
            await wait_ready(proc, api, sock, vm_id="r", console_path=None, then=good)
            assert [(m, p) for m, p, _ in seen] == [("GET", "/"), ("PUT", "/machine-config")]
            with pytest.raises(ApiError, match="rejected PUT /machine-config") as info:
                await wait_ready(proc, api, sock, vm_id="r", console_path=None, then=bad,
                                 timeout_s=30)  # fmt: skip
            assert info.value.status_code == 400 and len(seen) == 4  # asked once, not retried
    finally:
        proc.kill()
        await proc.wait()
    assert state.connections == 1
