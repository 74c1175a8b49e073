"""The VM handle's agent methods and ``ironclaw vm exec|cp``, through a fake vsock socket.

Firecracker's vsock socket is replaced by a small Unix-socket server that speaks its
``CONNECT`` handshake and forwards to a real agent; the real-VM path is in
tests/integration/test_agent_vsock_real.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from agent_helpers import fake_vsock_mux, running_agent, short_dir
from typer.testing import CliRunner

from ironclaw_orchestrator.cli import app
from ironclaw_orchestrator.errors import AgentConnectionError, UsageError
from ironclaw_orchestrator.registry import STATE_DIR_ENV, Registry
from ironclaw_orchestrator.vm import FirecrackerProcess, VmConfig

runner = CliRunner()


@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_dir() as d:
        yield d


@pytest.fixture
def agent_sock(workdir: Path) -> Iterator[Path]:
    with running_agent(workdir) as (sock, _proc):
        yield sock


def vm_handle(root: Path, **kw: object) -> FirecrackerProcess:
    config = VmConfig(vm_id="agent-vm", kernel_path="/k", rootfs_path=None, **kw)  # type: ignore[arg-type]
    return FirecrackerProcess(config, SimpleNamespace(chroot_dir=root))  # type: ignore[arg-type]


async def test_vm_handle_methods_over_vsock(agent_sock: Path, workdir: Path) -> None:
    root = workdir / "jail" / "root"
    vm = vm_handle(root, vsock_guest_cid=3)
    assert vm.vsock_path == root / "run" / "vsock.sock"
    async with fake_vsock_mux(vm.vsock_path, agent_sock) as asked:
        assert (await vm.wait_agent(timeout_s=30)).protocol_version == 1
        result = await vm.exec(["sh", "-c", "echo $X; exit 4"], env={"X": "y"})
        assert (result.exit_code, result.stdout) == (4, b"y\n")
        events = [e async for e in vm.exec_stream(["echo", "streamed"])]
        assert any(getattr(e, "data", b"") == b"streamed\n" for e in events)
        data = os.urandom(300_000)
        src = workdir / "src"
        src.write_bytes(data)
        put = await vm.put_file(src, str(workdir / "in-guest"))
        got = await vm.get_file(str(workdir / "in-guest"), workdir / "back")
        assert put == got and got.sha256 == hashlib.sha256(data).hexdigest()
        assert (workdir / "back").read_bytes() == data
    assert set(asked) == {5252}


async def test_vm_without_vsock_or_agent_is_explained(workdir: Path) -> None:
    with pytest.raises(UsageError, match="vsock_guest_cid"):
        await vm_handle(workdir).exec(["true"])
    vm = vm_handle(workdir / "root", vsock_guest_cid=3)
    with pytest.raises(AgentConnectionError, match="did not answer within"):
        await vm.wait_agent(timeout_s=0.2)  # no vsock socket at all
    async with fake_vsock_mux(vm.vsock_path, workdir / "none", port=1):
        with pytest.raises(AgentConnectionError, match="5252"):
            await vm.agent_ping()  # firecracker refuses: nothing listens on 5252


def test_cli_exec_passes_exit_code_and_output(agent_sock: Path) -> None:
    result = runner.invoke(
        app,
        ["vm", "exec", "x", "--agent", f"unix:{agent_sock}", "--env", "A=b", "--",
         "sh", "-c", "echo out-$A; exit 3"],
    )  # fmt: skip
    assert result.exit_code == 3, result.output
    assert "out-b" in result.output
    result = runner.invoke(
        app, ["vm", "exec", "x", "--agent", f"unix:{agent_sock}", "--timeout", "0.5",
              "--", "sleep", "60"],
    )  # fmt: skip
    assert result.exit_code == 137
    assert "timed out" in result.output


def test_cli_exec_and_cp_find_the_vm_in_the_registry(
    agent_sock: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = workdir / "state"
    monkeypatch.setenv(STATE_DIR_ENV, str(state))
    jail = workdir / "jail"
    Registry(state).claim(
        "reg-vm", jail_dir=jail, config={"vsock_guest_cid": 3, "vsock_uds_path": "/v.sock"}
    )
    Registry(state).claim("no-vsock", jail_dir=jail, config={"vsock_guest_cid": None})
    src = workdir / "file"
    src.write_bytes(b"payload")

    async def scenario() -> list[tuple[int, str]]:
        async with fake_vsock_mux(jail / "root" / "v.sock", agent_sock):
            calls = [
                ["vm", "exec", "reg-vm", "--", "sh", "-c", "echo hi; exit 9"],
                ["vm", "cp", str(src), f"reg-vm:{workdir}/copied"],
                ["vm", "cp", f"reg-vm:{workdir}/copied", str(workdir / "back")],
                ["vm", "exec", "no-vsock", "--", "true"],
                ["vm", "cp", str(src), str(workdir / "x")],
            ]
            out = []
            for args in calls:
                r = await asyncio.to_thread(runner.invoke, app, args)
                out.append((r.exit_code, r.output))
            return out

    results = asyncio.run(scenario())
    assert results[0][0] == 9 and "hi" in results[0][1]
    assert results[1][0] == 0 and (workdir / "copied").read_bytes() == b"payload"
    assert results[2][0] == 0 and (workdir / "back").read_bytes() == b"payload"
    assert results[3][0] == 2 and "no vsock device" in results[3][1]
    assert results[4][0] == 2 and "exactly one" in results[4][1]


def test_cli_exec_sends_stdin_and_cp_refuses_bad_input(agent_sock: Path, workdir: Path) -> None:
    agent = f"unix:{agent_sock}"
    result = runner.invoke(
        app, ["vm", "exec", "x", "-i", "--agent", agent, "--", "sha256sum"], input="hello\n"
    )
    assert result.exit_code == 0, result.output
    assert hashlib.sha256(b"hello\n").hexdigest() in result.output
    result = runner.invoke(
        app, ["vm", "exec", "x", "--agent", agent, "-e", "NOEQUALS", "--", "true"]
    )
    assert result.exit_code == 2 and "KEY=VALUE" in result.output
    result = runner.invoke(app, ["vm", "exec", "x", "--agent", "tcp:1", "--", "true"])
    assert result.exit_code == 2 and "unix:PATH" in result.output
    result = runner.invoke(app, ["vm", "cp", "--agent", agent, "--mode", "9z", "a", "x:/b"])
    assert result.exit_code == 2 and "octal" in result.output
    result = runner.invoke(app, ["vm", "cp", "--agent", agent, "x:/no/such/file", str(workdir)])
    assert result.exit_code == 1 and "not_found" not in result.output
    assert "cannot open /no/such/file" in result.output
