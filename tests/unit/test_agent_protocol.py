"""The wire protocol: framing limits, the handshake, bad frames, and hostile agents."""

from __future__ import annotations

import ast
import asyncio
import hashlib
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_helpers import fake_agent, raw_connect, recv, running_agent, send, short_dir

import ironclaw_orchestrator.agent as agent_pkg
from ironclaw_orchestrator.agent import AgentClient
from ironclaw_orchestrator.agent.protocol import (
    MAX_JSON,
    MAX_PAYLOAD,
    FrameError,
    decode_header,
    encode_frame,
    read_frame,
)
from ironclaw_orchestrator.errors import (
    AgentConnectionError,
    AgentProtocolError,
    AgentRequestError,
    AgentVersionMismatchError,
    TransferIntegrityError,
)

GUEST_MODULES = ("protocol.py", "server.py", "commands.py", "files.py", "__main__.py")


@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_dir() as d:
        yield d


# ---------------------------------------------------------------------- framing


def test_frame_round_trip_and_limits() -> None:
    frame = encode_frame({"t": "x", "n": 1}, b"\0\xff")
    json_len, payload_len = decode_header(frame[:8])
    assert frame[8 : 8 + json_len] == b'{"t":"x","n":1}' and payload_len == 2
    with pytest.raises(FrameError, match="JSON"):
        decode_header(struct.pack(">II", MAX_JSON + 1, 0))
    with pytest.raises(FrameError, match="JSON"):
        decode_header(struct.pack(">II", 0, 0))
    with pytest.raises(FrameError, match="payload"):
        decode_header(struct.pack(">II", 10, MAX_PAYLOAD + 1))
    with pytest.raises(FrameError):
        encode_frame({"t": "x"}, b"\0" * (MAX_PAYLOAD + 1))


async def test_read_frame_refuses_non_objects_and_truncation() -> None:
    for body in (b"[1,2]", b'{"t":5}', b"\xff\xfe", b"{not json"):
        reader = asyncio.StreamReader()
        reader.feed_data(struct.pack(">II", len(body), 0) + body)
        reader.feed_eof()
        with pytest.raises(FrameError):
            await read_frame(reader)
    reader = asyncio.StreamReader()
    reader.feed_data(encode_frame({"t": "x"}, b"abc")[:-1])
    reader.feed_eof()
    with pytest.raises(asyncio.IncompleteReadError):
        await read_frame(reader)
    reader = asyncio.StreamReader()
    reader.feed_eof()
    assert await read_frame(reader) is None


def test_guest_modules_parse_as_python_3_7() -> None:
    """The agent is copied into guest images whose Python may be old."""
    base = Path(agent_pkg.__file__).parent
    for name in GUEST_MODULES:
        ast.parse((base / name).read_text(), name, feature_version=(3, 7))
        text = (base / name).read_text()
        assert "ironclaw_orchestrator" not in text.replace("ironclaw_orchestrator.agent", "")
        assert "import pydantic" not in text and "from .." not in text


# ---------------------------------------------------------------------- the real agent


async def test_agent_refuses_a_version_it_does_not_speak(workdir: Path) -> None:
    with running_agent(workdir) as (sock, _):
        reader, writer = await raw_connect(sock, handshake=False)
        await send(writer, {"t": "hello", "proto": "ironclaw-agent", "versions": [99]})
        reply, _ = await recv(reader)
        assert reply["t"] == "error" and reply["code"] == "version_mismatch"
        assert "99" in str(reply["message"]) and "add-agent" in str(reply["message"])
        assert await reader.read() == b""  # and closes
        writer.close()


async def test_agent_survives_bad_frames(workdir: Path) -> None:
    with running_agent(workdir) as (sock, proc):
        garbage = [
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # not our protocol at all
            struct.pack(">II", 2**31, 0),  # absurd JSON length
            struct.pack(">II", 8, 2**30) + b'{"t":"x"}',  # absurd payload
            struct.pack(">II", 3, 0) + b"[1]",  # not an object
        ]
        for raw in garbage:
            reader, writer = await raw_connect(sock, handshake=False)
            writer.write(raw)
            await writer.drain()
            reply = await asyncio.wait_for(read_frame(reader), 30)
            assert reply is not None and reply[0]["t"] == "error"
            assert reply[0]["code"] == "bad_frame"
            assert await reader.read() == b""
            writer.close()
        # after the handshake: an unknown request and a bad one are answered, not fatal
        reader, writer = await raw_connect(sock)
        await send(writer, {"t": "frobnicate"})
        assert (await recv(reader))[0]["code"] == "unknown_request"
        await send(writer, {"t": "exec", "argv": "ls"})
        assert (await recv(reader))[0]["code"] == "bad_request"
        await send(writer, {"t": "exec", "argv": ["true"], "timeout_s": -1})
        assert (await recv(reader))[0]["code"] == "bad_request"
        await send(writer, {"t": "get", "path": "relative"})
        assert (await recv(reader))[0]["code"] == "bad_request"
        await send(writer, {"t": "ping"})
        assert (await recv(reader))[0]["t"] == "pong"
        writer.close()
        assert proc.poll() is None


async def test_connect_to_nothing_is_explained(workdir: Path) -> None:
    with pytest.raises(AgentConnectionError, match="ironclaw-agent running"):
        await AgentClient.connect_unix(workdir / "nobody.sock")


# ---------------------------------------------------------------------- hostile agents


async def test_client_refuses_a_newer_agent(workdir: Path) -> None:
    async def idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with fake_agent(workdir, idle, version=2) as sock:
        with pytest.raises(AgentVersionMismatchError, match="version 2"):
            await AgentClient.connect_unix(sock)


async def answer_with(workdir: Path, frames: list[bytes], call: str) -> BaseException:
    """Run client call ``call`` against an agent that answers its request with ``frames``."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frame(reader)
        writer.write(b"".join(frames))
        await writer.drain()
        await reader.read()

    async with fake_agent(workdir, handler) as sock:
        client = await AgentClient.connect_unix(sock, io_timeout_s=10)
        try:
            if call == "get":
                await client.get_file("/etc/hostname", workdir / "local")
            elif call == "get-small":
                await client.get_file("/x", workdir / "local", max_bytes=100)
            elif call == "exec":
                await client.exec(["true"], output_limit=1000, retries=0)
            elif call == "ping":
                await client.ping()
        except BaseException as exc:
            return exc
        finally:
            await client.close()
    raise AssertionError("the client accepted a hostile answer")


def f(msg: dict[str, object], payload: bytes = b"") -> bytes:
    return encode_frame(msg, payload)


GOOD_SHA = hashlib.sha256(b"0123456789").hexdigest()


async def test_hostile_get_answers(workdir: Path) -> None:
    cases = {
        "more data than announced": [
            f({"t": "file", "size": 10, "mode": 0o644}),
            f({"t": "data"}, b"0123456789"),
            f({"t": "data"}, b"extra"),
        ],
        "digest differs": [
            f({"t": "file", "size": 10, "mode": 0o644}),
            f({"t": "data"}, b"0123456789"),
            f({"t": "end", "size": 10, "sha256": "f" * 64}),
        ],
        "fewer bytes than announced": [
            f({"t": "file", "size": 20, "mode": 0o644}),
            f({"t": "data"}, b"0123456789"),
            f({"t": "end", "size": 20, "sha256": GOOD_SHA}),
        ],
        "negative size": [f({"t": "file", "size": -1, "mode": 0o644})],
        "size as a string": [f({"t": "file", "size": "10", "mode": 0o644})],
        "huge frame": [struct.pack(">II", 2**31, 0)],
    }
    for name, frames in cases.items():
        exc = await answer_with(workdir, frames, "get")
        assert isinstance(exc, AgentProtocolError | TransferIntegrityError), (name, exc)
        assert sorted(p.name for p in workdir.iterdir()) == ["fake.sock"], name
    exc = await answer_with(workdir, [f({"t": "file", "size": 10**12, "mode": 0})], "get-small")
    assert isinstance(exc, TransferIntegrityError) and "max_bytes" in str(exc)


async def test_hostile_exec_answers(workdir: Path) -> None:
    started = f({"t": "started", "exec_id": "x1", "pid": 5, "reused": False})
    cases = {
        "output at the wrong offset": [started, f({"t": "out", "fd": 1, "offset": 7}, b"hi")],
        "output beyond the limit": [started, f({"t": "out", "fd": 1, "offset": 0}, b"x" * 1001)],
        "unknown stream": [started, f({"t": "out", "fd": 3, "offset": 0}, b"hi")],
        "output before started": [f({"t": "out", "fd": 1, "offset": 0}, b"hi")],
        "exit code as a string": [
            started,
            f(
                {
                    "t": "exit",
                    "exec_id": "x1",
                    "exit_code": "0",
                    "signal": None,
                    "timed_out": False,
                    "duration_s": 0.1,
                    "stdout_dropped": 0,
                    "stderr_dropped": 0,
                }
            ),
        ],
        "exit of another command": [
            started,
            f(
                {
                    "t": "exit",
                    "exec_id": "x2",
                    "exit_code": 0,
                    "signal": None,
                    "timed_out": False,
                    "duration_s": 0.1,
                    "stdout_dropped": 0,
                    "stderr_dropped": 0,
                }
            ),
        ],
        "bad exec id": [f({"t": "started", "exec_id": "../../etc", "pid": 5, "reused": False})],
        "unexpected message": [f({"t": "pong", "agent": "x", "uptime_s": 1, "running": 0})],
    }
    for name, frames in cases.items():
        exc = await answer_with(workdir, frames, "exec")
        assert isinstance(exc, AgentProtocolError), (name, exc)


async def test_agent_error_answers_become_request_errors(workdir: Path) -> None:
    exc = await answer_with(workdir, [f({"t": "error", "code": "denied", "message": "no"})], "ping")
    assert isinstance(exc, AgentRequestError) and exc.code == "denied"
    exc = await answer_with(workdir, [f({"t": "error", "code": 5, "message": "x"})], "ping")
    assert isinstance(exc, AgentProtocolError)


async def test_hostile_put_acknowledgement(workdir: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frame(reader)
        writer.write(f({"t": "ready"}))
        while (frame := await read_frame(reader)) is not None and frame[0]["t"] != "end":
            pass
        writer.write(f({"t": "ok", "size": 3, "sha256": "0" * 64}))
        await reader.read()

    src = workdir / "src"
    src.write_bytes(b"abc")
    async with fake_agent(workdir, handler) as sock:
        client = await AgentClient.connect_unix(sock)
        with pytest.raises(TransferIntegrityError, match="SHA-256"):
            await client.put_file(src, "/tmp/x")
        await client.close()
