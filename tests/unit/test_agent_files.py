"""File transfers through the real agent: verified, atomic, and nothing left behind."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from agent_helpers import raw_connect, recv, running_agent, send, short_dir

from ironclaw_orchestrator.agent import AgentClient
from ironclaw_orchestrator.errors import AgentRequestError, ConfigError


@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_dir() as d:
        yield d


@pytest.fixture
def agent_sock(workdir: Path) -> Iterator[Path]:
    with running_agent(workdir) as (sock, _proc):
        yield sock


@pytest.fixture
async def agent(agent_sock: Path) -> AsyncIterator[AgentClient]:
    client = await AgentClient.connect_unix(agent_sock)
    yield client
    await client.close()


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def test_large_binary_round_trip(agent: AgentClient, workdir: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    src = workdir / "src.bin"
    src.write_bytes(data)
    src.chmod(0o750)
    guest = workdir / "guest" / "deep" / "file.bin"
    put = await agent.put_file(src, str(guest))
    assert put.size == len(data) and put.sha256 == hashlib.sha256(data).hexdigest()
    assert guest.read_bytes() == data
    assert stat.S_IMODE(guest.stat().st_mode) == 0o750
    back = workdir / "back.bin"
    got = await agent.get_file(str(guest), back)
    assert got == put
    assert back.read_bytes() == data
    assert listing(guest.parent) == ["file.bin"]
    assert ".ironclaw" not in "".join(listing(workdir))


async def test_put_explicit_mode_and_empty_file(agent: AgentClient, workdir: Path) -> None:
    src = workdir / "empty"
    src.write_bytes(b"")
    dst = workdir / "out"
    await agent.put_file(src, str(dst), mode=0o600)
    assert dst.read_bytes() == b"" and stat.S_IMODE(dst.stat().st_mode) == 0o600
    back = workdir / "back"
    assert (await agent.get_file(str(dst), back)).size == 0
    assert back.read_bytes() == b""


async def test_put_replaces_atomically_and_a_bad_put_changes_nothing(
    agent_sock: Path, workdir: Path
) -> None:
    target = workdir / "config.txt"
    target.write_bytes(b"old contents\n")
    reader, writer = await raw_connect(agent_sock)
    data = b"new contents\n"
    await send(
        writer,
        {"t": "put", "path": str(target), "size": len(data), "sha256": "0" * 64},
    )
    assert (await recv(reader))[0]["t"] == "ready"
    await send(writer, {"t": "data"}, data)
    await send(writer, {"t": "end"})
    reply, _ = await recv(reader)
    writer.close()
    assert reply["t"] == "error" and reply["code"] == "integrity"
    assert target.read_bytes() == b"old contents\n"
    assert listing(workdir) == ["agent.sock", "config.txt"]


async def test_put_cut_off_midway_leaves_old_file(agent_sock: Path, workdir: Path) -> None:
    target = workdir / "data"
    target.write_bytes(b"old")
    reader, writer = await raw_connect(agent_sock)
    await send(writer, {"t": "put", "path": str(target), "size": 100_000, "sha256": "a" * 64})
    assert (await recv(reader))[0]["t"] == "ready"
    await send(writer, {"t": "data"}, b"x" * 50_000)
    writer.close()  # the host goes away in the middle of the upload
    agent = await AgentClient.connect_unix(agent_sock)
    await agent.ping()  # the agent is fine and has finished with the broken upload
    await agent.close()
    assert target.read_bytes() == b"old"
    assert listing(workdir) == ["agent.sock", "data"]


async def test_get_errors_are_explained_and_leave_nothing(
    agent: AgentClient, workdir: Path
) -> None:
    local = workdir / "local"
    with pytest.raises(AgentRequestError) as info:
        await agent.get_file(str(workdir / "missing"), local)
    assert info.value.code == "not_found"
    with pytest.raises(AgentRequestError) as info:
        await agent.get_file(str(workdir), local)
    assert info.value.code == "not_a_file"
    assert not local.exists()
    with pytest.raises(ConfigError, match="absolute"):
        await agent.get_file("relative/path", local)
    with pytest.raises(ConfigError, match="regular file"):
        await agent.put_file(workdir, "/tmp/x")
    src = workdir / "f"
    src.write_bytes(b"x")
    with pytest.raises(AgentRequestError, match="directory"):
        await agent.put_file(src, "/tmp/")
    assert listing(workdir) == ["agent.sock", "f"]


async def test_get_into_a_directory_uses_the_guest_name(agent: AgentClient, workdir: Path) -> None:
    (workdir / "g").mkdir()
    (workdir / "g" / "report.txt").write_bytes(b"r")
    (workdir / "into").mkdir()
    await agent.get_file(str(workdir / "g" / "report.txt"), workdir / "into")
    assert (workdir / "into" / "report.txt").read_bytes() == b"r"


async def test_echo_round_trip(agent: AgentClient) -> None:
    data = os.urandom(1024 * 1024)
    assert await agent.echo(data) == data
