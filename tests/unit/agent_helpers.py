"""Shared by the agent tests: the real agent as a subprocess, raw frames, fake agents."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

from ironclaw_orchestrator.agent.protocol import encode_frame, hello, read_frame

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.contextmanager
def short_dir() -> Iterator[Path]:
    """A directory with a short path (Unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ica-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def running_agent(directory: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """``python -m ironclaw_orchestrator.agent --listen unix:...``; stopped and reaped after."""
    sock = directory / "agent.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ironclaw_orchestrator.agent", "--listen", f"unix:{sock}"],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise AssertionError(f"agent did not start: {err}")
            time.sleep(0.01)
        yield sock, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()


async def raw_connect(
    sock: Path, handshake: bool = True
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(str(sock), limit=2**20)
    if handshake:
        writer.write(encode_frame(hello("client")))
        frame = await read_frame(reader)
        assert frame is not None and frame[0]["t"] == "hello"
    return reader, writer


async def send(writer: asyncio.StreamWriter, msg: dict[str, object], payload: bytes = b"") -> None:
    writer.write(encode_frame(msg, payload))
    await writer.drain()


async def recv(reader: asyncio.StreamReader) -> tuple[dict[str, object], bytes]:
    frame = await asyncio.wait_for(read_frame(reader), 30)
    assert frame is not None, "connection closed"
    return frame


@contextlib.asynccontextmanager
async def fake_agent(directory: Path, handler: Handler, version: int = 1) -> AsyncIterator[Path]:
    """A hostile/broken agent: does the handshake (as ``version``), then runs ``handler``."""
    sock = directory / "fake.sock"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_frame(reader)
            writer.write(encode_frame(hello("agent", version=version, agent="fake")))
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(serve, str(sock))
    try:
        yield sock
    finally:
        server.close()
        await server.wait_closed()


def process_gone(pid: int) -> bool:
    """The process does not exist any more, or is a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"


async def wait_gone(pid: int, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process_gone(pid):
            return True
        await asyncio.sleep(0.02)
    return False


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def fake_vsock_mux(uds: Path, agent_sock: Path, port: int = 5252) -> AsyncIterator[list[int]]:
    """Firecracker's host side of vsock, as far as the host sees it: ``CONNECT <port>\\n`` ->
    ``OK <n>\\n``, then the bytes of the guest's listener (here: the agent's Unix socket).
    Yields the list of ports asked for."""
    asked: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        asked.append(int(line.split()[1]))
        if asked[-1] != port:
            writer.close()  # what firecracker does when nothing listens on that port
            return
        up_r, up_w = await asyncio.open_unix_connection(str(agent_sock))
        writer.write(b"OK 1073741824\n")

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_w), pump(up_r, writer), return_exceptions=True)

    uds.parent.mkdir(parents=True, exist_ok=True)
    server = await asyncio.start_unix_server(serve, str(uds))
    try:
        yield asked
    finally:
        server.close()
