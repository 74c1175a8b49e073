"""The per-VM vsock rate limit, measured end to end through the host-side path.

A fake Firecracker vsock endpoint on a Unix socket answers ``CONNECT`` like Firecracker and
then sinks or sources data, so the bytes cross real sockets and the asyncio streams the
library hands out. Rates are measured at the far end and must be within 10% of the limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ironclaw_orchestrator.errors import NetworkError
from ironclaw_orchestrator.vm.ratelimit import VsockRateLimit
from ironclaw_orchestrator.vm.vsock import VsockLimiter, connect_vsock, listen_vsock

LIMIT = 1 << 20  # 1 MiB/s
BURST = 64 << 10
PAYLOAD = 1 << 20


@dataclass
class Endpoint:
    path: Path
    received: list[tuple[float, int]] = field(default_factory=list)
    send: int = 0


@pytest.fixture
async def endpoint(tmp_path: Path) -> AsyncIterator[Endpoint]:
    ep = Endpoint(tmp_path / "v.sock")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        if not line.startswith(b"CONNECT 52"):
            writer.close()  # like Firecracker when nothing listens on that guest port
            return
        writer.write(b"OK 1073741824\n")
        if ep.send:
            writer.write(b"x" * ep.send)
        await writer.drain()
        while chunk := await reader.read(65536):
            ep.received.append((time.monotonic(), len(chunk)))
        writer.close()

    server = await asyncio.start_unix_server(handle, path=str(ep.path))
    async with server:
        yield ep


def measured_rate(total: int, elapsed: float) -> float:
    # The bucket starts full: the first BURST bytes pass at once.
    return (total - BURST) / elapsed


async def test_upload_is_limited_within_10_percent(endpoint: Endpoint) -> None:
    limiter = VsockLimiter(VsockRateLimit(bytes_per_s=LIMIT, bytes_burst=BURST))
    _, writer = await connect_vsock(endpoint.path, 52, limiter=limiter)
    start = time.monotonic()
    writer.write(b"y" * PAYLOAD)
    writer.close()  # without drain(): close() still sends everything, at the limited rate
    assert writer.is_closing()
    await writer.wait_closed()
    for _ in range(100):
        if sum(n for _, n in endpoint.received) >= PAYLOAD:
            break
        await asyncio.sleep(0.02)
    total = sum(n for _, n in endpoint.received)
    elapsed = endpoint.received[-1][0] - start
    assert total == PAYLOAD
    rate = measured_rate(total, elapsed)
    assert 0.9 * LIMIT <= rate <= 1.1 * LIMIT, f"{rate:.0f} B/s vs limit {LIMIT}"


async def test_download_is_limited_within_10_percent(endpoint: Endpoint) -> None:
    endpoint.send = PAYLOAD
    limiter = VsockLimiter(VsockRateLimit(bytes_per_s=LIMIT, bytes_burst=BURST))
    start = time.monotonic()  # the first chunk arrives with the handshake's OK line
    reader, writer = await connect_vsock(endpoint.path, 52, limiter=limiter)
    got = 0
    while got < PAYLOAD:
        chunk = await reader.read(65536)
        assert chunk
        got += len(chunk)
    elapsed = time.monotonic() - start
    writer.close()
    await writer.wait_closed()
    rate = measured_rate(got, elapsed)
    assert 0.9 * LIMIT <= rate <= 1.1 * LIMIT, f"{rate:.0f} B/s vs limit {LIMIT}"


async def test_unlimited_connection_is_plain(endpoint: Endpoint) -> None:
    _, writer = await connect_vsock(endpoint.path, 52)
    assert type(writer) is asyncio.StreamWriter
    writer.close()
    await writer.wait_closed()


async def test_connect_rate_within_10_percent(endpoint: Endpoint) -> None:
    rate = 10.0
    limiter = VsockLimiter(VsockRateLimit(connections_per_s=rate, connections_burst=1))
    start = time.monotonic()
    n = 8
    for _ in range(n):
        _, writer = await connect_vsock(endpoint.path, 52, limiter=limiter)
        writer.close()
    elapsed = time.monotonic() - start
    measured = (n - 1) / elapsed  # the first connection uses the initial token
    assert 0.9 * rate <= measured <= 1.1 * rate, f"{measured:.2f} conn/s vs {rate}"


async def test_refused_guest_port_is_clear(endpoint: Endpoint) -> None:
    with pytest.raises(NetworkError, match="did not accept vsock port 7"):
        await connect_vsock(endpoint.path, 7)


async def test_listener_refuses_connections_over_the_rate(tmp_path: Path) -> None:
    limiter = VsockLimiter(VsockRateLimit(connections_per_s=1, connections_burst=2))
    served: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.append(await reader.read(100))
        writer.close()

    uds = tmp_path / "v.sock"
    server = await listen_vsock(uds, 1024, handler, limiter=limiter)
    async with server:
        sock = Path(f"{uds}_1024")
        assert sock.stat().st_mode & 0o777 == 0o600
        results = []
        for _ in range(5):  # Firecracker connects here for each guest connection
            reader, writer = await asyncio.open_unix_connection(str(sock))
            try:
                writer.write(b"hi")
                await writer.drain()
                results.append(await reader.read(10))
            except ConnectionResetError:
                results.append(b"")  # closed at once: refused
            writer.close()
        await asyncio.sleep(0.05)
    assert served == [b"hi", b"hi"]
    assert limiter.refused_connections == 3


async def test_listener_meters_bytes_within_10_percent(tmp_path: Path) -> None:
    limiter = VsockLimiter(VsockRateLimit(bytes_per_s=LIMIT, bytes_burst=BURST))
    done = asyncio.Event()
    got = [0]
    stamps: list[float] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stamps.append(time.monotonic())
        while chunk := await reader.read(65536):
            got[0] += len(chunk)
        stamps.append(time.monotonic())
        writer.close()
        done.set()

    uds = tmp_path / "v.sock"
    server = await listen_vsock(uds, 1025, handler, limiter=limiter)
    async with server:
        _, writer = await asyncio.open_unix_connection(f"{uds}_1025")
        writer.write(b"z" * PAYLOAD)
        await writer.drain()
        writer.close()
        await asyncio.wait_for(done.wait(), 30)
    rate = measured_rate(got[0], stamps[1] - stamps[0])
    assert got[0] == PAYLOAD
    assert 0.9 * LIMIT <= rate <= 1.1 * LIMIT, f"{rate:.0f} B/s vs limit {LIMIT}"


async def test_handshake_timeout_says_so(tmp_path: Path) -> None:
    # Firecracker with a guest that never answers (no vsock driver): the CONNECT hangs.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    path = tmp_path / "silent.sock"
    server = await asyncio.start_unix_server(silent, path=str(path))
    async with server:
        with pytest.raises(NetworkError, match=r"port 52 .* timed out"):
            await connect_vsock(path, 52, timeout_s=0.2)
