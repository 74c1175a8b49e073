"""Host side: :class:`AgentClient`, the asyncio client of ``ironclaw-agent``.

The transport is pluggable (a coroutine returning a stream pair): a Unix socket for an agent
on this host (:meth:`AgentClient.connect_unix`), or a VM's vsock through Firecracker's
``CONNECT`` handshake (:meth:`AgentClient.connect_vsock`). Connections are pooled; each
operation takes one, and one that failed is never reused.

Commands carry an idempotency key, so :meth:`exec_stream` reconnects after a lost
connection (agent restart aside: a VM snapshot restore, a flaky socket) and resumes the
output where it stopped, without ever running the command twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path

from ..errors import (
    AgentConnectionError,
    AgentProtocolError,
    AgentRequestError,
    AgentVersionMismatchError,
    ConfigError,
    IronclawError,
)
from . import messages as m
from .protocol import (
    DEFAULT_OUTPUT_LIMIT,
    DEFAULT_VSOCK_PORT,
    SUPPORTED_VERSIONS,
    FrameError,
    Message,
    encode_frame,
    hello,
    read_frame,
)
from .streams import OutputTracker, exec_request
from .transfer import echo_through, receive_file, send_chunks, send_file

Connector = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]

DEFAULT_CONNECT_TIMEOUT_S = 10.0
#: How long a file transfer or ping may wait for the agent's next message.
DEFAULT_IO_TIMEOUT_S = 60.0
#: Extra time the host gives an agent beyond a command's own timeout.
TIMEOUT_GRACE_S = 30.0
MAX_IDLE = 4


class Connection:
    """One handshaken connection to the agent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, where: str):
        self.reader = reader
        self.writer = writer
        self.where = where
        self.version = 0
        self.agent = "?"

    async def send(self, msg: Message, payload: bytes = b"") -> None:
        try:
            self.writer.write(encode_frame(msg, payload))
            await self.writer.drain()
        except (OSError, RuntimeError) as exc:
            raise AgentConnectionError(
                f"{self.where}: connection lost while sending: {exc}"
            ) from exc

    async def recv(self, timeout_s: float | None = None) -> tuple[Message, bytes]:
        try:
            async with asyncio.timeout(timeout_s):
                frame = await read_frame(self.reader)
        except FrameError as exc:
            raise AgentProtocolError(f"{self.where}: bad frame from the agent: {exc}") from None
        except TimeoutError:
            raise AgentConnectionError(
                f"{self.where}: the agent sent nothing for {timeout_s} s; is it alive?"
            ) from None
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise AgentConnectionError(f"{self.where}: connection lost: {exc}") from exc
        if frame is None:
            raise AgentConnectionError(f"{self.where}: the agent closed the connection")
        return frame

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class AgentClient:
    """Run commands and move files through an ``ironclaw-agent``.

    Use :meth:`connect_unix` or :meth:`connect_vsock`; close with :meth:`close` (or
    ``async with``).
    """

    def __init__(
        self,
        connector: Connector,
        *,
        where: str,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        io_timeout_s: float = DEFAULT_IO_TIMEOUT_S,
    ) -> None:
        self._connector = connector
        self.where = where
        self.connect_timeout_s = connect_timeout_s
        self.io_timeout_s = io_timeout_s
        self._idle: list[Connection] = []

    # ------------------------------------------------------------------ connecting
    @classmethod
    async def connect_unix(cls, path: str | os.PathLike[str], **kw: float) -> AgentClient:
        """A client of the agent listening on the Unix socket ``path`` (handshake done)."""

        async def connector() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_unix_connection(os.fspath(path), limit=2**20)

        return await cls._connected(connector, f"agent at unix:{os.fspath(path)}", kw)

    @classmethod
    async def connect_vsock(
        cls, uds_path: str | os.PathLike[str], port: int = DEFAULT_VSOCK_PORT, **kw: float
    ) -> AgentClient:
        """A client of the agent in a VM, via its Firecracker vsock socket ``uds_path``."""
        from ..vm.vsock import connect_vsock

        timeout = kw.get("connect_timeout_s", DEFAULT_CONNECT_TIMEOUT_S)

        async def connector() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            try:
                return await connect_vsock(Path(uds_path), port, timeout_s=timeout)
            except IronclawError as exc:
                raise AgentConnectionError(str(exc)) from exc

        return await cls._connected(connector, f"agent at vsock port {port} via {uds_path}", kw)

    @classmethod
    async def _connected(
        cls, connector: Connector, where: str, kw: Mapping[str, float]
    ) -> AgentClient:
        client = cls(connector, where=where, **kw)
        client._idle.append(await client._open())
        return client

    async def _open(self) -> Connection:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                reader, writer = await self._connector()
        except TimeoutError:
            raise AgentConnectionError(f"{self.where}: connecting timed out") from None
        except OSError as exc:
            raise AgentConnectionError(
                f"cannot reach the {self.where}: {exc}; is ironclaw-agent running there?"
            ) from exc
        conn = Connection(reader, writer, self.where)
        try:
            await conn.send(hello("client"))
            msg, _ = await conn.recv(self.connect_timeout_s)
            if msg.get("t") == "error" and msg.get("code") == "version_mismatch":
                raise AgentVersionMismatchError(f"{self.where}: {str(msg.get('message'))[:500]}")
            reply = m.check_hello(msg, self.where)
            if reply.version not in SUPPORTED_VERSIONS:
                raise AgentVersionMismatchError(
                    f"{self.where}: agent {reply.agent} chose protocol version {reply.version}, "
                    f"this host speaks {list(SUPPORTED_VERSIONS)}: install a matching agent "
                    "(ironclaw image add-agent) or upgrade the host"
                )
        except BaseException:
            conn.close()
            raise
        conn.version, conn.agent = reply.version, reply.agent
        return conn

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        conn = self._idle.pop() if self._idle else await self._open()
        ok = False
        try:
            yield conn
            ok = True
        finally:
            if ok and len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
            else:
                conn.close()

    async def _retrying(self, op: Callable[[Connection], Awaitable[m.T]], retries: int = 2) -> m.T:
        """Run an idempotent operation, on a fresh connection after a lost one."""
        for attempt in range(retries + 1):
            try:
                async with self._connection() as conn:
                    return await op(conn)
            except AgentConnectionError:
                if attempt == retries:
                    raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ simple requests
    async def ping(self) -> m.AgentInfo:
        """Check that the agent answers; what it says about itself."""

        async def op(conn: Connection) -> m.AgentInfo:
            await conn.send({"t": "ping"})
            pong = m.parse((await conn.recv(self.io_timeout_s))[0], m.PongMsg, where=self.where)
            assert isinstance(pong, m.PongMsg)
            return m.AgentInfo(pong.agent, conn.version, pong.uptime_s, pong.running)

        return await self._retrying(op)

    async def signal(self, exec_id: str, signum: int) -> None:
        """Send ``signum`` to the process group of a running command."""

        async def op(conn: Connection) -> None:
            await conn.send({"t": "signal", "exec_id": exec_id, "signal": int(signum)})
            m.parse((await conn.recv(self.io_timeout_s))[0], m.OkMsg, where=self.where)

        await self._retrying(op)

    async def put_file(
        self,
        local: str | os.PathLike[str],
        guest_path: str,
        *,
        mode: int | None = None,
        mkdirs: bool = True,
    ) -> m.FileTransfer:
        """Copy ``local`` to ``guest_path``, atomically, verified by size and SHA-256.

        ``mode`` defaults to the local file's permission bits.
        """
        _check_guest_path(guest_path)
        if mode is not None and not 0 <= mode <= 0o7777:
            raise ConfigError(f"put_file: mode {mode:#o} is not a file mode (0 .. 0o7777)")
        return await self._retrying(
            lambda conn: send_file(conn, Path(local), guest_path, mode, mkdirs, self.io_timeout_s)
        )

    async def get_file(
        self, guest_path: str, local: str | os.PathLike[str], *, max_bytes: int | None = None
    ) -> m.FileTransfer:
        """Copy ``guest_path`` to ``local`` (atomically), verified by size and SHA-256.

        Nothing the agent says is trusted: more bytes than it announced, a size above
        ``max_bytes``, or a digest that differs from the bytes received fail the transfer,
        and ``local`` is left as it was.
        """
        _check_guest_path(guest_path)
        return await self._retrying(
            lambda conn: receive_file(conn, guest_path, Path(local), max_bytes, self.io_timeout_s)
        )

    async def echo(self, data: bytes, *, digest: bool = True) -> bytes:
        """Send ``data`` through the agent and back (diagnostics).

        The bytes that come back must be ``data`` (compared by SHA-256 here); with ``digest``
        the agent's own SHA-256 of what it received must match too.
        """

        return await self._retrying(
            lambda conn: echo_through(conn, data, digest, self.io_timeout_s)
        )

    # ------------------------------------------------------------------ commands
    async def exec(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout_s: float | None = None,
        user: str | None = None,
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
        idempotency_key: str | None = None,
        retries: int = 3,
    ) -> m.ExecResult:
        """Run ``argv`` in the guest and wait until its process exits.

        Output is kept up to ``output_limit`` bytes per stream (``stdout_dropped`` /
        ``stderr_dropped`` count the rest). A ``timeout_s`` kills the command's whole process
        group (``timed_out`` is set). A lost connection is retried with the same
        ``idempotency_key`` (random unless given): the command never runs twice.
        """
        out = {"stdout": bytearray(), "stderr": bytearray()}
        async for event in self.exec_stream(
            argv, env=env, cwd=cwd, stdin=stdin, timeout_s=timeout_s, user=user,
            output_limit=output_limit, idempotency_key=idempotency_key, retries=retries,
        ):  # fmt: skip
            if isinstance(event, m.ExecOutput):
                out[event.stream] += event.data
            elif isinstance(event, m.ExecExit):
                return m.ExecResult(
                    event.exit_code, bytes(out["stdout"]), bytes(out["stderr"]), event.signal,
                    event.timed_out, event.duration_s, event.exec_id,
                    event.stdout_dropped, event.stderr_dropped,
                )  # fmt: skip
        raise AgentProtocolError(f"{self.where}: the output stream ended without an exit")

    async def exec_stream(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout_s: float | None = None,
        user: str | None = None,
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
        idempotency_key: str | None = None,
        retries: int = 3,
    ) -> AsyncIterator[m.ExecEvent]:
        """Run ``argv``, yielding ``ExecStarted``, ``ExecOutput``, ``ExecTruncated`` and,
        last, ``ExecExit`` events as they happen (see :meth:`exec` for the semantics).

        Leaving the loop early leaves the command running: :meth:`attach` to it again by
        ``ExecStarted.exec_id``, or :meth:`signal` it.
        """
        request = exec_request(argv, env, cwd, stdin, timeout_s, user, output_limit)
        request["key"] = idempotency_key or uuid.uuid4().hex
        async for event in self._stream(request, stdin, None, (0, 0), output_limit, retries):
            yield event

    async def attach(
        self,
        exec_id: str,
        *,
        stdout_offset: int = 0,
        stderr_offset: int = 0,
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
        retries: int = 3,
    ) -> AsyncIterator[m.ExecEvent]:
        """Re-attach to a command's output (from the given offsets) until it exits."""
        offsets = (stdout_offset, stderr_offset)
        async for event in self._stream(None, None, exec_id, offsets, output_limit, retries):
            yield event

    async def _stream(
        self,
        request: Message | None,
        stdin: bytes | None,
        exec_id: str | None,
        offsets: tuple[int, int],
        limit: int,
        retries: int,
    ) -> AsyncIterator[m.ExecEvent]:
        tracker = OutputTracker(self.where, offsets, limit, exec_id)
        deadline = None
        if request is not None and request.get("timeout_s") is not None:
            deadline = asyncio.get_running_loop().time() + request["timeout_s"] + TIMEOUT_GRACE_S
        attempt = 0
        while True:
            try:
                async with self._connection() as conn:
                    if tracker.exec_id is None and request is not None:
                        await conn.send(dict(request, offsets=list(tracker.received)))
                        if stdin is not None:
                            await send_chunks(conn, stdin, "stdin", "stdin_end")
                    else:
                        await conn.send(
                            {
                                "t": "attach",
                                "exec_id": tracker.exec_id,
                                "offsets": list(tracker.received),
                            }
                        )
                    while True:
                        left = (
                            None
                            if deadline is None
                            else deadline - asyncio.get_running_loop().time()
                        )
                        msg, payload = await conn.recv(None if left is None else max(left, 0.001))
                        event = tracker.accept(msg, payload)
                        if event is not None:
                            yield event
                        if isinstance(event, m.ExecExit):
                            return
            except AgentConnectionError:
                attempt += 1
                if attempt > retries:
                    raise
                await asyncio.sleep(min(0.05 * 2**attempt, 1.0))


def _check_guest_path(path: str) -> None:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise ConfigError(f"guest path {path!r} must be absolute (start with '/')")


__all__ = ["AgentClient", "AgentRequestError", "Connection"]
