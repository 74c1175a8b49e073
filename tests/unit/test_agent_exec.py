"""The real agent (a subprocess on a Unix socket) running commands: every exec semantic."""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from agent_helpers import (
    kill_quietly,
    process_gone,
    raw_connect,
    recv,
    running_agent,
    send,
    short_dir,
    wait_gone,
)

from ironclaw_orchestrator.agent import (
    AgentClient,
    ExecExit,
    ExecOutput,
    ExecStarted,
    ExecTruncated,
)
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


async def test_ping_reports_agent_and_protocol(agent: AgentClient) -> None:
    info = await agent.ping()
    assert info.protocol_version == 1
    assert info.agent_version
    assert info.running == 0


async def test_exit_code_stdout_stderr_env_cwd(agent: AgentClient, workdir: Path) -> None:
    result = await agent.exec(
        ["sh", "-c", 'echo "$GREETING"; pwd; echo oops >&2; exit 7'],
        env={"GREETING": "hello"},
        cwd=str(workdir),
    )
    assert result.exit_code == 7
    assert result.stdout == f"hello\n{workdir}\n".encode()
    assert result.stderr == b"oops\n"
    assert result.signal is None and not result.timed_out and not result.ok


async def test_binary_stdin_and_stdout(agent: AgentClient) -> None:
    data = bytes(range(256)) * 4096 + os.urandom(70_000)
    result = await agent.exec(["cat"], stdin=data)
    assert result.exit_code == 0
    assert result.stdout == data


async def test_signal_death_is_reported(agent: AgentClient) -> None:
    result = await agent.exec(["sh", "-c", "kill -TERM $$"])
    assert result.signal == signal.SIGTERM
    assert result.exit_code == 128 + signal.SIGTERM
    assert not result.timed_out


async def test_finished_when_process_exits_not_when_pipes_close(agent: AgentClient) -> None:
    # The background sleep inherits stdout and keeps it open long after sh exited.
    result = await agent.exec(["sh", "-c", "sleep 600 & echo $!"], timeout_s=300)
    assert result.exit_code == 0 and not result.timed_out
    holder = int(result.stdout)
    try:
        assert not process_gone(holder), "the pipe holder should still be running"
    finally:
        kill_quietly(holder)


async def test_timeout_kills_the_whole_process_group(agent: AgentClient, workdir: Path) -> None:
    pidfile = workdir / "child.pid"
    result = await agent.exec(["sh", "-c", f"sleep 600 & echo $! > {pidfile}; wait"], timeout_s=1)
    assert result.timed_out
    assert result.signal == signal.SIGKILL
    assert result.exit_code == 128 + signal.SIGKILL
    child = int(pidfile.read_text())
    try:
        assert await wait_gone(child), "the background child survived the timeout"
    finally:
        kill_quietly(child)


async def test_output_is_bounded_with_a_truncation_marker(agent: AgentClient) -> None:
    limit = 1_000_000
    events = [
        e
        async for e in agent.exec_stream(["head", "-c", "3000000", "/dev/zero"], output_limit=limit)
    ]
    data = b"".join(e.data for e in events if isinstance(e, ExecOutput))
    assert len(data) == limit
    marks = [e for e in events if isinstance(e, ExecTruncated)]
    assert [(m.stream, m.limit) for m in marks] == [("stdout", limit)]
    exit_ = events[-1]
    assert isinstance(exit_, ExecExit) and exit_.stdout_dropped == 2_000_000
    # the marker comes after the last byte kept
    assert events.index(marks[0]) > max(
        i for i, e in enumerate(events) if isinstance(e, ExecOutput)
    )
    result = await agent.exec(["head", "-c", "3000000", "/dev/zero"], output_limit=limit)
    assert len(result.stdout) == limit and result.stdout_dropped == 2_000_000 and result.truncated


async def test_slow_reader_holds_the_producer_back(agent: AgentClient, workdir: Path) -> None:
    mark = workdir / "finished"
    size = 64 * 1024 * 1024
    stream = agent.exec_stream(
        ["sh", "-c", f"head -c {size} /dev/zero; touch {mark}"], output_limit=size
    )
    got = 0
    async for event in stream:
        if isinstance(event, ExecOutput):
            got += len(event.data)
            break
    # The client reads nothing now; the agent must stop reading the pipe, not buffer 64 MiB.
    await asyncio.sleep(1.0)
    assert not mark.exists(), "the producer ran ahead of a client that stopped reading"
    async for event in stream:
        if isinstance(event, ExecOutput):
            got += len(event.data)
    assert got == size
    assert mark.exists()


async def test_reattach_after_disconnect_resumes_output(agent_sock: Path) -> None:
    script = "for i in 1 2 3 4 5 6; do echo line$i; sleep 0.1; done; echo err >&2"
    client = await AgentClient.connect_unix(agent_sock)
    seen = b""
    exec_id = ""
    async for event in client.exec_stream(["sh", "-c", script]):
        if isinstance(event, ExecStarted):
            exec_id = event.exec_id
        elif isinstance(event, ExecOutput):
            seen += event.data
            break  # leaving the loop drops the connection; the command keeps running
    await client.close()
    again = await AgentClient.connect_unix(agent_sock)
    rest = b""
    err = b""
    events = []
    async for event in again.attach(exec_id, stdout_offset=len(seen)):
        events.append(event)
        if isinstance(event, ExecOutput):
            if event.stream == "stdout":
                rest += event.data
            else:
                err += event.data
    await again.close()
    assert seen + rest == b"".join(b"line%d\n" % i for i in range(1, 7))
    assert err == b"err\n"
    assert isinstance(events[0], ExecStarted) and events[0].reused
    assert isinstance(events[-1], ExecExit) and events[-1].exit_code == 0


async def test_client_vanishing_mid_stream_leaves_command_and_agent_fine(
    agent_sock: Path, agent: AgentClient, workdir: Path
) -> None:
    reader, writer = await raw_connect(agent_sock)
    await send(writer, {"t": "exec", "argv": ["sh", "-c", "sleep 0.3; echo survived"]})
    started, _ = await recv(reader)
    assert started["t"] == "started"
    writer.close()  # gone without a word
    events = [e async for e in agent.attach(str(started["exec_id"]))]
    out = b"".join(e.data for e in events if isinstance(e, ExecOutput))
    assert out == b"survived\n"
    assert (await agent.ping()).running == 0


async def test_idempotency_key_never_runs_twice(agent: AgentClient, workdir: Path) -> None:
    counter = workdir / "runs"
    argv = ["sh", "-c", f"echo run >> {counter}; echo done"]
    first = await agent.exec(argv, idempotency_key="job-42")
    second = await agent.exec(argv, idempotency_key="job-42")
    assert counter.read_text() == "run\n"
    assert first.exec_id == second.exec_id
    assert second.stdout == first.stdout == b"done\n"
    with pytest.raises(AgentRequestError) as info:
        await agent.exec(["true"], idempotency_key="job-42")
    assert info.value.code == "key_conflict"


async def test_retry_after_lost_connection_runs_once(agent_sock: Path, workdir: Path) -> None:
    """A proxy cuts the first connection mid-output; exec() reconnects with its key."""
    counter = workdir / "runs"
    cuts = 0

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal cuts
        up_r, up_w = await asyncio.open_unix_connection(str(agent_sock))
        cut = cuts == 0
        cuts += 1

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, limit: int) -> None:
            passed = 0
            while data := await src.read(4096):
                if cut and passed + len(data) > limit:
                    dst.write(data[: limit - passed])
                    break
                passed += len(data)
                dst.write(data)
                await dst.drain()

        # hello (~100 bytes) + started + some output, then the wire "breaks".
        down = asyncio.ensure_future(pump(up_r, writer, 400))
        up = asyncio.ensure_future(pump(reader, up_w, 10**9))
        await asyncio.wait([down, up], return_when=asyncio.FIRST_COMPLETED)
        for task in (down, up):
            task.cancel()
        writer.close()
        up_w.close()

    proxy_sock = workdir / "proxy.sock"
    server = await asyncio.start_unix_server(proxy, str(proxy_sock))
    try:
        client = await AgentClient.connect_unix(proxy_sock)
        script = f"echo run >> {counter}; for i in $(seq 1 200); do echo line-$i; done"
        result = await client.exec(["sh", "-c", script])
        await client.close()
    finally:
        server.close()
        await server.wait_closed()
    assert cuts >= 2, "the proxy never cut a connection: the test proves nothing"
    assert counter.read_text() == "run\n"
    assert result.stdout == b"".join(b"line-%d\n" % i for i in range(1, 201))


async def test_signal_a_running_command(agent: AgentClient) -> None:
    stream = agent.exec_stream(["sleep", "600"])
    first = await anext(stream)
    assert isinstance(first, ExecStarted)
    await agent.signal(first.exec_id, signal.SIGTERM)
    last = [e async for e in stream][-1]
    assert isinstance(last, ExecExit) and last.signal == signal.SIGTERM


async def test_spawn_failures_are_explained(agent: AgentClient, workdir: Path) -> None:
    with pytest.raises(AgentRequestError, match="no-such-program") as info:
        await agent.exec(["no-such-program-xyz"])
    assert info.value.code == "spawn_failed"
    with pytest.raises(AgentRequestError) as info:
        await agent.exec(["true"], cwd=str(workdir / "missing"))
    assert info.value.code == "spawn_failed"
    with pytest.raises(AgentRequestError, match="no user"):
        await agent.exec(["true"], user="no-such-user-xyz")
    with pytest.raises(ConfigError, match="argv"):
        await agent.exec([])
    assert (await agent.ping()).running == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
async def test_run_as_another_user(agent: AgentClient) -> None:
    nobody = pwd.getpwnam("nobody")
    result = await agent.exec(["sh", "-c", 'id -u; echo "$HOME"'], user="nobody")
    assert result.stdout == f"{nobody.pw_uid}\n{nobody.pw_dir}\n".encode()


async def test_many_concurrent_commands(agent: AgentClient) -> None:
    results = await asyncio.gather(*(agent.exec(["sh", "-c", f"echo {i}"]) for i in range(20)))
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(20)]


async def test_finished_commands_are_forgotten_within_bounds() -> None:
    from ironclaw_orchestrator.agent import commands

    table = commands.CommandTable()
    running = commands.Command("k-running", ["sleep"], 10)
    table.add(running)
    for i in range(commands.KEEP_FINISHED + 5):
        cmd = commands.Command(f"k{i}", ["true"], 10)
        cmd.result = {"exit_code": 0}
        table.add(cmd)
    assert running.id in table.by_id  # a running command is never forgotten
    assert len(table.by_id) == commands.KEEP_FINISHED + 1
    assert table.find_key("k0") is None and table.find_key(f"k{commands.KEEP_FINISHED + 4}")
    big = commands.Command("big", ["cat"], commands.MAX_KEPT_BYTES)
    big.logs[1].append(b"x" * commands.MAX_KEPT_BYTES)
    big.result = {"exit_code": 0}
    table.add(big)
    newest = commands.Command("newest", ["true"], 10)
    newest.result = {"exit_code": 0}
    newest.logs[1].append(b"y")
    table.add(newest)  # kept output now exceeds the bound: old ones go, big one included
    assert table.find_key("big") is None and table.find_key("newest") is newest


async def test_stopping_the_agent_kills_running_commands(workdir: Path) -> None:
    with running_agent(workdir) as (sock, proc):
        client = await AgentClient.connect_unix(sock)
        stream = client.exec_stream(["sh", "-c", "sleep 600 & echo $!; wait"])
        pids = []
        async for event in stream:
            if isinstance(event, ExecStarted):
                pids.append(event.pid)
            elif isinstance(event, ExecOutput):
                pids.append(int(event.data))
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        await stream.aclose()
        await client.close()
    try:
        for pid in pids:
            assert await wait_gone(pid), f"process {pid} outlived the agent"
    finally:
        for pid in pids:
            kill_quietly(pid)


def test_agent_listens_on_vsock_when_the_host_has_it() -> None:
    import socket
    import subprocess
    import sys

    if not hasattr(socket, "AF_VSOCK"):
        pytest.skip("no AF_VSOCK in this Python")
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except OSError as exc:
        pytest.skip(f"this host has no vsock ({exc})")
    port = 40000 + os.getpid() % 20000
    proc = subprocess.Popen(
        [sys.executable, "-m", "ironclaw_orchestrator.agent", "--listen", f"vsock:{port}"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert f"listening on vsock:{port}" in line
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        if proc.stderr:
            proc.stderr.close()
