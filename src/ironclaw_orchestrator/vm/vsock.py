"""Host side of Firecracker's vsock: connections to the guest, listeners for the guest, and
ironclaw's per-VM vsock rate limit.

Firecracker exposes the guest's vsock as a Unix socket (``uds_path``, inside the jail). A host
connection opens it, sends ``CONNECT <port>\\n`` and reads ``OK <host port>\\n`` once the guest
accepted; if nothing listens on that guest port, Firecracker closes the connection. A guest
connecting to host port ``P`` makes Firecracker connect to ``<uds_path>_P``, which the host
must listen on (:func:`listen_vsock`).

Rate limit (Firecracker has none for vsock): a :class:`VsockLimiter` per VM meters every byte
and every connection that goes through *these* functions: bytes in both directions share one
token bucket, and connections another (host connects wait for a token; guest connections
beyond the rate are closed at once). It cannot meter what bypasses ironclaw: a root process
on the host that opens the jail's vsock socket itself, or traffic between the guest and
anything else (the network device has Firecracker's own limiter).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..errors import NetworkError
from .ratelimit import VsockRateLimit

DEFAULT_CONNECT_TIMEOUT_S = 5.0
#: Largest chunk written at once under a byte limit (keeps the rate smooth).
_CHUNK = 16 << 10

log = logging.getLogger(__name__)
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class AsyncTokenBucket:
    """Tokens refill continuously at ``rate`` per second up to ``capacity``.

    ``take(n)`` may run the balance into debt (a chunk already received cannot be refused);
    the caller then waits ``debt / rate`` before going on, so the long-run rate is exact.
    """

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self._tokens = capacity
        self._stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def take(self, n: float) -> float:
        """Spend ``n`` tokens now; return the seconds to wait until the balance is >= 0."""
        self._refill()
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def try_take(self, n: float = 1) -> bool:
        self._refill()
        if self._tokens < n:
            return False
        self._tokens -= n
        return True

    async def acquire(self, n: float) -> None:
        delay = self.take(n)
        if delay:
            await asyncio.sleep(delay)


class VsockLimiter:
    """One VM's vsock limits, shared by all of its host-side connections."""

    def __init__(self, limit: VsockRateLimit) -> None:
        self.limit = limit
        self.bytes = (
            AsyncTokenBucket(limit.bytes_per_s, limit.bytes_burst or limit.bytes_per_s)
            if limit.bytes_per_s
            else None
        )
        self.connections = (
            AsyncTokenBucket(
                limit.connections_per_s,
                limit.connections_burst or max(1.0, limit.connections_per_s),
            )
            if limit.connections_per_s
            else None
        )
        #: Guest-initiated connections closed because they came too fast.
        self.refused_connections = 0


class _MeteredProtocol(asyncio.StreamReaderProtocol):
    """Received bytes reach the reader only once the bucket has paid for them: while it is
    in debt, the transport is paused and the data held back."""

    def __init__(self, reader: asyncio.StreamReader, bucket: AsyncTokenBucket, **kw: Any) -> None:
        super().__init__(reader, **kw)
        self._bucket = bucket
        self._reader = reader
        self._transport: asyncio.Transport | None = None
        self._held: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        delay = self._bucket.take(len(data))
        if not delay and not self._held:
            super().data_received(data)
            return
        self._held.append(data)
        if self._transport is not None:
            self._transport.pause_reading()
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(delay, self._release)

    def _release(self) -> None:
        self._timer = None
        delay = self._bucket.take(0)
        if delay:  # more arrived meanwhile
            self._timer = asyncio.get_running_loop().call_later(delay, self._release)
            return
        held, self._held = self._held, []
        for chunk in held:
            super().data_received(chunk)
        transport = self._transport
        # Leave it paused if the reader paused it itself (its buffer is full).
        reader_paused = getattr(self._reader, "_paused", False)
        if transport is not None and not transport.is_closing() and not reader_paused:
            transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held, self._held = self._held, []
        for chunk in held:
            super().data_received(chunk)
        super().connection_lost(exc)


class _MeteredWriter(asyncio.StreamWriter):
    """Bytes leave through the bucket: ``drain()`` waits until they were allowed out."""

    def __init__(self, *args: Any, bucket: AsyncTokenBucket) -> None:
        super().__init__(*args)
        self._bucket = bucket
        self._lock = asyncio.Lock()
        self._pending = bytearray()
        self._closer: asyncio.Task[None] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._pending += data

    def writelines(self, data: Any) -> None:
        for chunk in data:
            self.write(chunk)

    async def drain(self) -> None:
        async with self._lock:
            while self._pending:
                chunk = bytes(self._pending[:_CHUNK])
                del self._pending[:_CHUNK]
                await self._bucket.acquire(len(chunk))
                super().write(chunk)
                await super().drain()
        await super().drain()

    def close(self) -> None:
        """Close once what was written has been sent (at the limited rate)."""
        if self._pending and self._closer is None:
            self._closer = asyncio.ensure_future(self._flush_then_close())
        elif self._closer is None:
            super().close()

    async def _flush_then_close(self) -> None:
        try:
            await self.drain()
        except OSError:
            pass  # peer gone: nothing left to flush to
        finally:
            super().close()

    def is_closing(self) -> bool:
        return self._closer is not None or super().is_closing()

    async def wait_closed(self) -> None:
        if self._closer is not None:
            await self._closer
        await super().wait_closed()

    def write_eof(self) -> None:
        if self._pending:
            raise RuntimeError("write_eof() with unsent data: await drain() first")
        super().write_eof()


async def _open(
    path: str, limiter: VsockLimiter | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if limiter is None or limiter.bytes is None:
        return await asyncio.open_unix_connection(path)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(loop=loop)
    protocol = _MeteredProtocol(reader, limiter.bytes)
    transport, _ = await loop.create_unix_connection(lambda: protocol, path)
    return reader, _MeteredWriter(transport, protocol, reader, loop, bucket=limiter.bytes)


async def connect_vsock(
    uds_path: Path,
    port: int,
    *,
    timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    limiter: VsockLimiter | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a stream to guest vsock ``port`` through Firecracker's host socket ``uds_path``.

    With ``limiter``, the connection waits for a connection token and its bytes are metered;
    under a byte limit, written data leaves only as ``drain()`` is awaited.
    """
    if not 0 <= port < 2**32:
        raise NetworkError(f"vsock port {port} is out of range (0 .. 2**32-1)")
    try:
        async with asyncio.timeout(timeout_s):
            if limiter is not None and limiter.connections is not None:
                await limiter.connections.acquire(1)
            reader, writer = await _open(str(uds_path), limiter)
    except (OSError, TimeoutError) as exc:
        why = str(exc) or "timed out"
        raise NetworkError(
            f"cannot open the vsock socket {uds_path}: {why}; is the VM configured "
            "with a vsock device (VmConfig.vsock_guest_cid) and started?"
        ) from exc
    try:
        writer.write(f"CONNECT {port}\n".encode())
        async with asyncio.timeout(timeout_s):
            await writer.drain()
            line = await reader.readline()
    except (OSError, TimeoutError) as exc:
        writer.close()
        why = str(exc) or "timed out"
        raise NetworkError(
            f"vsock handshake with guest port {port} via {uds_path} failed: {why};"
            " check that the guest listens on that port"
        ) from exc
    if not line.startswith(b"OK "):
        writer.close()
        got = line.decode(errors="replace").strip() or "connection closed"
        raise NetworkError(
            f"guest did not accept vsock port {port} via {uds_path} ({got}): nothing in the guest "
            "listens on that port, or the guest has not booted its vsock driver yet"
        )
    return reader, writer


async def listen_vsock(
    uds_path: Path,
    port: int,
    handler: Handler,
    *,
    uid: int | None = None,
    gid: int | None = None,
    limiter: VsockLimiter | None = None,
) -> asyncio.Server:
    """Serve guest connections to host port ``port``: listen on ``<uds_path>_<port>``.

    ``uid``/``gid``: owner of the socket file, so that the jailed VMM may connect to it.
    With ``limiter``, connections beyond its rate are closed at once and bytes are metered.
    """
    if not 0 <= port < 2**32:
        raise NetworkError(f"vsock port {port} is out of range (0 .. 2**32-1)")
    path = Path(f"{uds_path}_{port}")
    loop = asyncio.get_running_loop()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns = limiter.connections if limiter is not None else None
        if conns is not None and not conns.try_take():
            assert limiter is not None
            limiter.refused_connections += 1
            log.warning("vsock %s: guest connection refused: over the connection rate", path)
            writer.close()
            return
        await handler(reader, writer)

    def factory() -> asyncio.StreamReaderProtocol:
        if limiter is None or limiter.bytes is None:
            return asyncio.StreamReaderProtocol(asyncio.StreamReader(loop=loop), on_connect)
        reader = asyncio.StreamReader(loop=loop)
        bucket = limiter.bytes

        def metered(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> Awaitable[None]:
            return on_connect(r, _MeteredWriter(w.transport, proto, r, loop, bucket=bucket))

        proto = _MeteredProtocol(reader, bucket, client_connected_cb=metered)
        return proto

    try:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        server = await loop.create_unix_server(factory, str(path))
        if uid is not None and gid is not None:
            os.chown(path, uid, gid)
        os.chmod(path, 0o600)
    except OSError as exc:
        raise NetworkError(
            f"cannot listen for guest vsock connections on {path}: {exc.strerror or exc}; "
            "the VM's jail must exist (start the VM first)"
        ) from exc
    return server
