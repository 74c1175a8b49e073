"""Guest side: file transfers for the agent (standard library only, Python 3.7+).

``put`` writes into a temporary file beside the target, checks size and SHA-256 against
what the host announced, fsyncs, then renames it over the target (and fsyncs the
directory): the target is either the old file or the complete new one, never a torn write.
``get`` streams a regular file and ends with its size and SHA-256.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
from typing import TYPE_CHECKING, Any

from .protocol import CHUNK, FrameError, Message

if TYPE_CHECKING:
    from .server import Conn


class RequestError(Exception):
    """A request the agent refuses; ``code`` goes to the client with the message."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


def guest_path(msg: Message, key: str = "path") -> str:
    path = msg.get(key)
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise RequestError(f"{key!r} must be an absolute path in the guest, got {path!r}")
    return path


def _int(msg: Message, key: str, lo: int, hi: int, default: Any = None) -> int:
    value = msg.get(key, default)
    if type(value) is not int or not lo <= value <= hi:
        raise RequestError(f"{key!r} must be an integer in {lo} .. {hi}, got {value!r}")
    return value


async def handle_put(conn: Conn, msg: Message) -> None:
    """``put`` -> ``ready``, then ``data`` frames and ``end`` -> ``ok`` (or ``error``)."""
    path = guest_path(msg)
    mode = _int(msg, "mode", 0, 0o7777, 0o644)
    size = _int(msg, "size", 0, 2**62)
    sha = msg.get("sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        raise RequestError(f"'sha256' must be 64 hex digits, got {sha!r}")
    directory, name = os.path.split(path)
    if not name:
        raise RequestError(f"'path' {path!r} names a directory, not a file")
    if msg.get("mkdirs"):
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise RequestError(f"cannot create {directory}: {exc}", "io_error") from None
    tmp = os.path.join(directory, f".{name[:200]}.ironclaw-{secrets.token_hex(6)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise RequestError(f"cannot write in {directory}: {exc}", "io_error") from None
    done = False
    try:
        await conn.send({"t": "ready"})
        digest = hashlib.sha256()
        received = 0
        failure = None
        while True:
            m, payload = await conn.recv()
            if m["t"] == "end":
                break
            if m["t"] != "data":
                raise FrameError(
                    f"expected 'data' or 'end' during put, got {m['t']!r}", "bad_sequence"
                )
            received += len(payload)
            if received > size:
                raise FrameError(
                    f"put of {path}: more than the announced {size} bytes", "bad_sequence"
                )
            digest.update(payload)
            if failure is None:
                try:
                    _write_all(fd, payload)
                except OSError as exc:
                    failure = exc  # keep reading so the connection stays in step
        if failure is not None:
            raise RequestError(f"writing {path} failed: {failure}", "io_error")
        if received != size or digest.hexdigest() != sha.lower():
            raise RequestError(
                f"{path}: received {received} bytes with SHA-256 {digest.hexdigest()}, "
                f"announced {size} bytes with {sha}; nothing was written",
                "integrity",
            )
        try:
            os.fchmod(fd, mode)
            os.fsync(fd)
            os.replace(tmp, path)
            done = True
            _fsync_dir(directory)
        except OSError as exc:
            raise RequestError(f"cannot put {path}: {exc}", "io_error") from None
        await conn.send({"t": "ok", "size": received, "sha256": digest.hexdigest()})
    finally:
        os.close(fd)
        if not done:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(directory: str) -> None:
    try:
        dfd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


async def handle_get(conn: Conn, msg: Message) -> None:
    """``get`` -> ``file`` {size, mode}, ``data`` frames, ``end`` {size, sha256}."""
    path = guest_path(msg)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        code = "not_found" if isinstance(exc, FileNotFoundError) else "io_error"
        raise RequestError(f"cannot open {path}: {exc.strerror}", code) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RequestError(f"{path} is not a regular file", "not_a_file")
        info: dict[str, Any] = {"t": "file", "size": st.st_size, "mode": stat.S_IMODE(st.st_mode)}
        await conn.send(info)
        digest = hashlib.sha256()
        left = st.st_size
        while left > 0:
            try:
                chunk = os.read(fd, min(CHUNK, left))
            except OSError as exc:
                await conn.send({"t": "error", "code": "io_error", "message": f"{path}: {exc}"})
                return
            if not chunk:
                await conn.send(
                    {"t": "error", "code": "changed", "message": f"{path} shrank while read"}
                )
                return
            digest.update(chunk)
            left -= len(chunk)
            await conn.send({"t": "data"}, chunk)
        await conn.send({"t": "end", "size": st.st_size, "sha256": digest.hexdigest()})
    finally:
        os.close(fd)
