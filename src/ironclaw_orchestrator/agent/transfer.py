"""Host side of ``put`` and ``get``: files verified end to end by size and SHA-256.

A download goes to a temporary file beside ``local`` and is renamed over it only after the
byte count and the digest of what actually arrived match what the agent announced; any
other outcome removes the temporary file. The only path used on the host is the caller's.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AgentProtocolError, AgentRequestError, ConfigError, TransferIntegrityError
from . import messages as m
from .protocol import CHUNK

if TYPE_CHECKING:
    from .client import Connection


def _open_local(local: Path) -> tuple[int, os.stat_result, str]:
    try:
        fd = os.open(local, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"put_file: cannot read {local}: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ConfigError(f"put_file: {local} is not a regular file")
    digest = hashlib.sha256()
    while chunk := os.read(fd, 1 << 20):
        digest.update(chunk)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd, st, digest.hexdigest()


async def send_file(
    conn: Connection,
    local: Path,
    guest_path: str,
    mode: int | None,
    mkdirs: bool,
    io_timeout_s: float,
) -> m.FileTransfer:
    fd, st, sha = _open_local(local)
    where = f"{conn.where}: put {local} -> {guest_path}"
    try:
        request = {
            "t": "put", "path": guest_path, "size": st.st_size, "sha256": sha,
            "mode": stat.S_IMODE(st.st_mode) if mode is None else mode, "mkdirs": mkdirs,
        }  # fmt: skip
        await conn.send(request)
        m.parse((await conn.recv(io_timeout_s))[0], m.ReadyMsg, where=where)
        left = st.st_size
        while left > 0:
            chunk = os.read(fd, min(CHUNK, left))
            if not chunk:
                raise TransferIntegrityError(f"{where}: {local} shrank while it was sent")
            left -= len(chunk)
            await conn.send({"t": "data"}, chunk)
        await conn.send({"t": "end"})
        try:
            ok = m.parse((await conn.recv(io_timeout_s))[0], m.OkMsg, where=where)
        except AgentRequestError as exc:
            if exc.code == "integrity":
                raise TransferIntegrityError(f"{where}: {exc}") from None
            raise
    finally:
        os.close(fd)
    assert isinstance(ok, m.OkMsg)
    if ok.size != st.st_size or ok.sha256 != sha:
        raise m.integrity(where, "put", st.st_size, sha, ok.size or 0, ok.sha256 or "")
    return m.FileTransfer(st.st_size, sha)


async def receive_file(
    conn: Connection, guest_path: str, local: Path, max_bytes: int | None, io_timeout_s: float
) -> m.FileTransfer:
    where = f"{conn.where}: get {guest_path} -> {local}"
    if local.is_dir():
        local = local / (Path(guest_path).name or "download")
    await conn.send({"t": "get", "path": guest_path})
    info = m.parse((await conn.recv(io_timeout_s))[0], m.FileMsg, where=where)
    assert isinstance(info, m.FileMsg)
    if max_bytes is not None and info.size > max_bytes:
        raise TransferIntegrityError(
            f"{where}: the agent announces {info.size} bytes, more than max_bytes={max_bytes}"
        )
    tmp = local.parent / f".{local.name}.ironclaw-{os.getpid()}-{id(conn):x}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"get_file: cannot write in {local.parent}: {exc.strerror}") from None
    kept = False
    try:
        digest = hashlib.sha256()
        received = 0
        while True:
            msg, payload = await conn.recv(io_timeout_s)
            got = m.parse(msg, m.DataMsg, m.EndMsg, where=where)
            if isinstance(got, m.EndMsg):
                break
            received += len(payload)
            if received > info.size:
                raise AgentProtocolError(
                    f"{where}: the agent sent more than the {info.size} bytes it announced"
                )
            digest.update(payload)
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
        sha = digest.hexdigest()
        if received != info.size or got.size != received or got.sha256 != sha:
            raise m.integrity(where, "get", received, sha, got.size, got.sha256 or "none")
        os.fchmod(fd, info.mode & 0o777 & ~_umask())
        os.fsync(fd)
        os.replace(tmp, local)
        kept = True
    finally:
        os.close(fd)
        if not kept:
            tmp.unlink(missing_ok=True)
    return m.FileTransfer(received, sha)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


async def echo_through(conn: Connection, data: bytes, digest: bool, io_timeout_s: float) -> bytes:
    """``echo``: ``data`` to the agent and back, read while it is written (see client.echo)."""
    where = f"{conn.where} (echo)"
    await conn.send({"t": "echo", "digest": digest})
    m.parse((await conn.recv(io_timeout_s))[0], m.ReadyMsg, where=where)
    sender = asyncio.ensure_future(send_chunks(conn, data))
    back = bytearray()
    try:
        while True:
            msg, payload = await conn.recv(io_timeout_s)
            got = m.parse(msg, m.DataMsg, m.EndMsg, where=where)
            if isinstance(got, m.EndMsg):
                break
            if len(back) + len(payload) > len(data):
                raise AgentProtocolError(f"{where}: more came back than was sent")
            back += payload
        await sender
    finally:
        sender.cancel()
    want = hashlib.sha256(data).hexdigest()
    theirs = got.sha256 if digest else want
    if got.size != len(data) or theirs != want or hashlib.sha256(back).hexdigest() != want:
        raise m.integrity(where, "echo", len(data), want, got.size, got.sha256 or "none")
    return bytes(back)


async def send_chunks(conn: Connection, data: bytes, kind: str = "data", end: str = "end") -> None:
    """``data`` as ``kind`` frames of at most :data:`CHUNK` bytes, then an ``end`` frame."""
    for i in range(0, len(data), CHUNK):
        await conn.send({"t": kind}, data[i : i + CHUNK])
    await conn.send({"t": end})
