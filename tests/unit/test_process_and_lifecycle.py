"""pidfd-tracked children, readiness and stop, with stand-in programs (no firecracker needed)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from ironclaw_orchestrator.errors import ApiSocketTimeoutError, JailerError, VmExitedError
from ironclaw_orchestrator.vm.api import FirecrackerApi
from ironclaw_orchestrator.vm.lifecycle import (
    exited_error,
    parse_jailer_error,
    stop_process,
    wait_ready,
)
from ironclaw_orchestrator.vm.process import ChildProcess, read_start_time


def script(tmp: Path, body: str) -> Path:
    path = tmp / "prog"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


async def test_spawn_wait_exit_code_and_output(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    proc = ChildProcess.spawn(
        [str(script(tmp_path, "echo hello; echo err >&2; exit 7"))], stdout_path=out
    )
    assert await proc.wait() == 7
    assert out.read_text() == "hello\nerr\n"
    assert not proc.alive


async def test_kill_reaps_no_zombie(tmp_path: Path) -> None:
    proc = ChildProcess.spawn(["/bin/sleep", "30"], stdout_path=tmp_path / "o")
    assert proc.alive and read_start_time(proc.pid) is not None
    assert proc.kill()
    assert await proc.wait() == -9
    assert not Path(f"/proc/{proc.pid}").exists()
    assert proc.kill() is False  # never signals a (possibly recycled) pid after exit


async def test_wait_timeout(tmp_path: Path) -> None:
    proc = ChildProcess.spawn(["/bin/sleep", "30"], stdout_path=tmp_path / "o")
    try:
        with pytest.raises(TimeoutError):
            await proc.wait(0.05)
    finally:
        proc.kill()
        await proc.wait()


async def test_child_has_own_process_group(tmp_path: Path) -> None:
    proc = ChildProcess.spawn(["/bin/sleep", "30"], stdout_path=tmp_path / "o")
    try:
        assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0)
    finally:
        proc.kill()
        await proc.wait()


async def test_ready_raises_at_once_when_process_dies(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    proc = ChildProcess.spawn([str(script(tmp_path, "echo 'bad things'; exit 3"))], stdout_path=out)
    api = FirecrackerApi(tmp_path / "api.sock", vm_id="t")
    try:
        with pytest.raises(VmExitedError) as info:
            await wait_ready(
                proc, api, tmp_path / "api.sock", vm_id="t", console_path=out, timeout_s=30
            )
    finally:
        await api.aclose()
    assert info.value.exit_code == 3
    assert "bad things" in str(info.value) and "status 3" in str(info.value)


async def test_ready_timeout_names_socket_and_cause(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    proc = ChildProcess.spawn(["/bin/sleep", "30"], stdout_path=out)
    sock = tmp_path / "api.sock"
    api = FirecrackerApi(sock, vm_id="t")
    try:
        with pytest.raises(ApiSocketTimeoutError) as info:
            await wait_ready(proc, api, sock, vm_id="t", console_path=out, timeout_s=0.1)
        assert str(sock) in str(info.value) and "never created" in str(info.value)
    finally:
        await stop_process(proc, api, graceful=True, timeout_s=0.1)  # no API: falls back to kill
        await api.aclose()
    assert proc.returncode == -9


async def test_ready_timeout_explains_overlong_socket_path(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    proc = ChildProcess.spawn(["/bin/sleep", "30"], stdout_path=out)
    sock = tmp_path / ("x" * 120) / "api.sock"
    api = FirecrackerApi(sock, vm_id="t")
    try:
        with pytest.raises(ApiSocketTimeoutError, match="over the 107-byte limit"):
            await wait_ready(proc, api, sock, vm_id="t", console_path=out, timeout_s=0.05)
    finally:
        proc.kill()
        await proc.wait()
        await api.aclose()


def test_jailer_error_is_parsed_with_fix(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    out.write_text(
        "thread 'main' panicked at 'Jailer error: Failed to canonicalize path /nope: "
        "No such file or directory (os error 2)', src/jailer/src/main.rs:1\n"
    )
    assert parse_jailer_error(out.read_text()) is not None
    err = exited_error("vm1", 134, out, what="the jailer")
    assert isinstance(err, JailerError)
    assert err.exit_code == 134 and "mkdir -p" in str(err)
    out.write_text("Jailer error: Cgroup error: Controller memory is unavailable\n")
    err = exited_error("vm1", 134, out)
    assert isinstance(err, JailerError) and "cgroup_version=1" in str(err)


async def test_stop_on_exited_process_returns_code(tmp_path: Path) -> None:
    proc = ChildProcess.spawn(["/bin/true"], stdout_path=tmp_path / "o")
    await proc.wait()
    assert await stop_process(proc, None, graceful=False) == 0


async def test_stdin_is_a_pipe_we_hold_until_exit(tmp_path: Path) -> None:
    """Firecracker polls stdin (serial input) with epoll: it must be a pipe, kept open."""
    out = tmp_path / "o"
    proc = ChildProcess.spawn(
        [str(script(tmp_path, "readlink /proc/self/fd/0; exec sleep 30"))], stdout_path=out
    )
    try:
        assert proc.stdin_fd is not None
        for _ in range(400):
            if out.read_text():
                break
            await asyncio.sleep(0.005)
        assert out.read_text().startswith("pipe:")
    finally:
        proc.kill()
        await proc.wait()
    assert proc.stdin_fd is None  # closed with the child
