"""Host side of Firecracker's vsock: connecting to a port the guest listens on.

Firecracker exposes the guest's vsock as a Unix socket (``uds_path``, inside the jail). A host
connection opens it, sends ``CONNECT <port>\\n`` and reads ``OK <host port>\\n`` once the guest
accepted; if nothing listens on that guest port, Firecracker closes the connection.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from ..errors import NetworkError

DEFAULT_CONNECT_TIMEOUT_S = 5.0


async def connect_vsock(
    uds_path: Path, port: int, *, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a stream to guest vsock ``port`` through Firecracker's host socket ``uds_path``."""
    if not 0 <= port < 2**32:
        raise NetworkError(f"vsock port {port} is out of range (0 .. 2**32-1)")
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_unix_connection(str(uds_path))
    except (OSError, TimeoutError) as exc:
        raise NetworkError(
            f"cannot open the vsock socket {uds_path}: {exc}; is the VM configured with a vsock "
            "device (VmConfig.vsock_guest_cid) and started?"
        ) from exc
    try:
        writer.write(f"CONNECT {port}\n".encode())
        async with asyncio.timeout(timeout_s):
            await writer.drain()
            line = await reader.readline()
    except (OSError, TimeoutError) as exc:
        writer.close()
        raise NetworkError(
            f"vsock handshake with guest port {port} via {uds_path} failed: {exc or 'timed out'};"
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
