"""``ironclaw-agent``: the guest agent (standard library only, Python 3.7+).

Serves the protocol of docs/agent-protocol.md on vsock inside a guest (default port
:data:`~.protocol.DEFAULT_VSOCK_PORT`) or on a Unix socket anywhere::

    ironclaw-agent --listen unix:/tmp/agent.sock
    ironclaw-agent --listen vsock:5252

Each connection starts with the ``hello`` handshake, then carries requests one after the
other. Commands outlive the connection that started them, not the agent: on SIGTERM or
SIGINT it kills the process groups of the commands still running, then exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import stat
import sys
import time
from typing import Any

from . import commands as cmds
from .files import RequestError, handle_get, handle_put
from .protocol import (
    DEFAULT_VSOCK_PORT,
    PROTOCOL_NAME,
    FrameError,
    Message,
    choose_version,
    encode_frame,
    error,
    hello,
    read_frame,
)

AGENT_VERSION = "0.1.0"
MAX_KEY = 256


class Conn:
    """One client connection: frame I/O on a stream pair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, msg: Message, payload: bytes = b"") -> None:
        self.writer.write(encode_frame(msg, payload))
        await self.writer.drain()

    async def recv(self) -> tuple[Message, bytes]:
        frame = await read_frame(self.reader)
        if frame is None:
            raise ConnectionResetError("client closed the connection")
        return frame


class Agent:
    """The agent's state: the command table, shared by all connections."""

    def __init__(self) -> None:
        self.table = cmds.CommandTable()
        self.started = time.monotonic()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(reader, writer)
        try:
            if await self._handshake(conn):
                while True:
                    frame = await read_frame(reader)
                    if frame is None:
                        break
                    await self._dispatch(conn, *frame)
        except FrameError as exc:
            with contextlib.suppress(Exception):
                await conn.send(error(exc.code, str(exc)))
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass  # the client went away; its commands keep running
        except Exception as exc:  # a bug of ours: say so, and keep serving others
            with contextlib.suppress(Exception):
                await conn.send(error("internal", f"agent error: {type(exc).__name__}: {exc}"))
        finally:
            writer.close()

    async def _handshake(self, conn: Conn) -> bool:
        msg, _ = await conn.recv()
        if msg["t"] != "hello" or msg.get("proto") != PROTOCOL_NAME:
            raise FrameError(f"expected a {PROTOCOL_NAME} 'hello' first, got {msg['t']!r}")
        version = choose_version(msg.get("versions"))
        if version is None:
            await conn.send(
                error(
                    "version_mismatch",
                    f"ironclaw-agent {AGENT_VERSION} speaks protocol versions "
                    f"{list(hello('agent')['versions'])}, the client offered "
                    f"{msg.get('versions')!r}: install a matching agent in the guest "
                    "(ironclaw image add-agent) or upgrade the host",
                )
            )
            return False
        await conn.send(hello("agent", version=version, agent=AGENT_VERSION, pid=os.getpid()))
        return True

    async def _dispatch(self, conn: Conn, msg: Message, payload: bytes) -> None:
        kind = msg["t"]
        try:
            if kind == "ping":
                await conn.send(
                    {
                        "t": "pong",
                        "agent": AGENT_VERSION,
                        "uptime_s": round(time.monotonic() - self.started, 3),
                        "running": self.table.running(),
                    }
                )
            elif kind == "exec":
                await self._exec(conn, msg)
            elif kind == "attach":
                cmd = self._find(msg)
                await self._stream(conn, cmd, True, _offsets(msg))
            elif kind == "signal":
                cmd = self._find(msg)
                cmd.kill(_signal(msg))
                await conn.send({"t": "ok"})
            elif kind == "put":
                await handle_put(conn, msg)
            elif kind == "get":
                await handle_get(conn, msg)
            elif kind == "echo":
                await self._echo(conn, msg.get("digest") is not False)
            else:
                raise RequestError(f"unknown request {kind!r}", "unknown_request")
        except RequestError as exc:
            await conn.send(error(exc.code, str(exc)))

    def _find(self, msg: Message) -> cmds.Command:
        cmd = self.table.by_id.get(str(msg.get("exec_id")))
        if cmd is None:
            raise RequestError(
                f"no command {msg.get('exec_id')!r} (finished long ago, or the agent restarted)",
                "unknown_exec",
            )
        return cmd

    async def _exec(self, conn: Conn, msg: Message) -> None:
        problem: RequestError | None = None
        try:
            req = _exec_request(msg)
        except RequestError as exc:
            problem, req = exc, {}
        stdin = None
        if msg.get("stdin") is True:  # read stdin to its end first: a retry never sees half
            stdin = cmds.stdin_file() if problem is None else None
            while True:
                m, data = await conn.recv()
                if m["t"] == "stdin_end":
                    break
                if m["t"] != "stdin":
                    raise FrameError(
                        f"expected 'stdin' or 'stdin_end', got {m['t']!r}", "bad_sequence"
                    )
                if stdin is not None:
                    stdin.write(data)
            if stdin is not None:
                stdin.seek(0)
        try:
            if problem is not None:
                raise problem
            cmd = self.table.find_key(req["key"])
            reused = cmd is not None
            if cmd is None:
                cmd = cmds.Command(req["key"], req["argv"], req["output_limit"])
                try:
                    cmd.start(req["env"], req["cwd"], req["user"], stdin, req["timeout_s"])
                except cmds.SpawnError as exc:
                    raise RequestError(str(exc), "spawn_failed") from None
                self.table.add(cmd)
            elif cmd.argv != req["argv"]:
                raise RequestError(
                    f"idempotency key {req['key']!r} was used for {cmd.argv!r}, "
                    f"not {req['argv']!r}",
                    "key_conflict",
                )
        finally:
            if stdin is not None:
                stdin.close()
        await self._stream(conn, cmd, reused, req["offsets"])

    async def _stream(
        self, conn: Conn, cmd: cmds.Command, reused: bool, offsets: tuple[int, int]
    ) -> None:
        """Send ``started``, the output from ``offsets``, ``truncated`` markers, ``exit``."""
        await conn.send({"t": "started", "exec_id": cmd.id, "pid": cmd.pid, "reused": reused})
        cursor = cmds.Cursor(*offsets)
        cmd.cursors.append(cursor)
        watcher = asyncio.ensure_future(self._watch_client(conn, cmd))
        marked: list[int] = []
        try:
            while True:
                waiter = cmd.waiter()
                sent = False
                for fd in (1, 2):
                    log = cmd.logs[fd]
                    off = min(cursor.offsets[fd], len(log.data))
                    data = log.read(off, cmds.READ_SIZE)
                    if data:
                        await conn.send({"t": "out", "fd": fd, "offset": off}, data)
                        cursor.offsets[fd] = off + len(data)
                        sent = True
                    elif log.truncated and fd not in marked:
                        await conn.send({"t": "truncated", "fd": fd, "limit": log.limit})
                        marked.append(fd)
                if sent:
                    cmd.cursor_moved()
                    continue
                if cmd.result is not None:
                    await conn.send(dict(cmd.result, t="exit", exec_id=cmd.id))
                    return
                await asyncio.wait([waiter, watcher], return_when=asyncio.FIRST_COMPLETED)
                if watcher.done():
                    watcher.result()  # the client left or broke the protocol: raise
        finally:
            watcher.cancel()  # a cancelled read consumes nothing: the connection stays in step
            await asyncio.wait([watcher])
            if not watcher.cancelled():
                watcher.exception()  # retrieved: the loop above already acted on it
            cmd.cursors.remove(cursor)
            cmd.cursor_moved()

    async def _watch_client(self, conn: Conn, cmd: cmds.Command) -> None:
        """While streaming, the client may only send ``signal`` (e.g. Ctrl-C)."""
        while True:
            m, _ = await conn.recv()
            if m["t"] != "signal":
                raise FrameError(f"only 'signal' may be sent while output streams, got {m['t']!r}")
            try:
                cmd.kill(_signal(m))
            except RequestError:
                raise FrameError("bad signal number") from None

    async def _echo(self, conn: Conn, digest_wanted: bool) -> None:
        """Diagnostics: send every ``data`` payload back, then its size (and SHA-256)."""
        await conn.send({"t": "ready"})
        digest, size = hashlib.sha256(), 0
        while True:
            m, data = await conn.recv()
            if m["t"] == "end":
                break
            if m["t"] != "data":
                raise FrameError(
                    f"expected 'data' or 'end' during echo, got {m['t']!r}", "bad_sequence"
                )
            digest.update(data)
            size += len(data)
            await conn.send({"t": "data"}, data)
        end: Message = {"t": "end", "size": size}
        if digest_wanted:
            end["sha256"] = digest.hexdigest()
        await conn.send(end)


def _exec_request(msg: Message) -> dict[str, Any]:
    argv = msg.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise RequestError(f"'argv' must be a non-empty list of strings, got {argv!r}")
    env = msg.get("env")
    if env is not None and not (
        isinstance(env, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    ):
        raise RequestError("'env' must map strings to strings")
    for key in ("cwd", "user", "key"):
        if msg.get(key) is not None and not isinstance(msg[key], str):
            raise RequestError(f"{key!r} must be a string, got {msg[key]!r}")
    if len(msg.get("key") or "") > MAX_KEY:
        raise RequestError(f"'key' is longer than {MAX_KEY} characters")
    timeout = msg.get("timeout_s")
    if timeout is not None and (type(timeout) not in (int, float) or not 0 < timeout < 10**9):
        raise RequestError(f"'timeout_s' must be a positive number, got {timeout!r}")
    limit = msg.get("output_limit", cmds.DEFAULT_OUTPUT_LIMIT)
    if type(limit) is not int or not 0 <= limit <= cmds.MAX_OUTPUT_LIMIT:
        raise RequestError(f"'output_limit' must be 0 .. {cmds.MAX_OUTPUT_LIMIT}, got {limit!r}")
    return {
        "argv": argv, "env": env, "cwd": msg.get("cwd"), "user": msg.get("user"),
        "key": msg.get("key"), "timeout_s": timeout, "output_limit": limit,
        "offsets": _offsets(msg),
    }  # fmt: skip


def _offsets(msg: Message) -> tuple[int, int]:
    offsets = msg.get("offsets", [0, 0])
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
    ):
        raise RequestError(f"'offsets' must be two non-negative integers, got {offsets!r}")
    return offsets[0], offsets[1]


def _signal(msg: Message) -> int:
    num = msg.get("signal")
    if type(num) is not int or not 1 <= num < signal.NSIG:
        raise RequestError(f"'signal' must be a signal number, got {num!r}")
    return num


# ---------------------------------------------------------------------- listening


def _listen_socket(spec: str) -> tuple[socket.socket, str | None]:
    """A listening socket for ``unix:PATH``, ``vsock`` or ``vsock:PORT``."""
    if spec.startswith("unix:"):
        path = spec[5:]
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # a stale socket of an earlier agent
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = f"{path}.{os.getpid()}"
        old = os.umask(0o077)
        try:
            sock.bind(tmp)
        finally:
            os.umask(old)
        sock.listen(64)
        os.rename(tmp, path)  # the socket appears only once it accepts connections
        return sock, path
    if spec == "vsock" or spec.startswith("vsock:"):
        port = int(spec[6:]) if spec.startswith("vsock:") else DEFAULT_VSOCK_PORT
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)  # type: ignore[attr-defined,unused-ignore]
        sock.bind((socket.VMADDR_CID_ANY, port))  # type: ignore[attr-defined,unused-ignore]
        sock.listen(64)
        return sock, None
    raise ValueError(f"--listen {spec!r}: use unix:PATH, vsock or vsock:PORT")


async def serve(specs: list[str]) -> None:
    """Serve on every listen spec until SIGTERM or SIGINT."""
    agent = Agent()
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _set, stop)
    servers, paths = [], []
    try:
        for spec in specs:
            sock, path = _listen_socket(spec)
            if path:
                paths.append(path)
            servers.append(await asyncio.start_server(agent.handle, sock=sock, limit=2**20))
            print(
                f"ironclaw-agent {AGENT_VERSION}: listening on {spec}", file=sys.stderr, flush=True
            )
        await stop
    finally:
        for server in servers:
            server.close()
        for cmd in agent.table.by_id.values():
            if cmd.result is None:
                cmd.kill(signal.SIGKILL)  # nothing outlives the agent that started it
        for path in paths:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _set(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ironclaw-agent",
        description="The ironclaw guest agent: runs commands and moves files for the host "
        "over vsock (or a Unix socket). Protocol: docs/agent-protocol.md.",
    )
    parser.add_argument(
        "--listen",
        action="append",
        metavar="SPEC",
        help=f"unix:PATH, vsock or vsock:PORT (repeatable; default: vsock:{DEFAULT_VSOCK_PORT})",
    )
    args = parser.parse_args(argv)
    specs = args.listen or [f"vsock:{DEFAULT_VSOCK_PORT}"]
    try:
        asyncio.run(serve(specs))
    except (OSError, ValueError) as exc:
        print(f"ironclaw-agent: {exc}", file=sys.stderr)
        return 1
    return 0
