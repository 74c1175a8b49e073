"""``vm run`` around the VM (cli/vm.py ``run_vm``): whatever happens to the console copy,
the VM is stopped and cleaned up; ``vm logs -f`` ends when its reader is gone. The VM is
faked; what is checked is the CLI's handling."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ironclaw_orchestrator.cli import vm as cli_vm
from ironclaw_orchestrator.cli.common import ExitCode


class FakeVm:
    """What run_vm uses of a FirecrackerProcess; the guest writes ``output`` when started."""

    def __init__(self, console: Path, output: bytes, *, exits: bool) -> None:
        self.vm_id = "fake-1"
        self.pid = 4242
        self.console_path = console
        self.is_sandboxed = True
        self.output = output
        self.exits = exits
        self.stops = 0
        console.write_bytes(b"")

    async def start_instance(self) -> None:
        with self.console_path.open("ab") as f:
            f.write(self.output)

    async def wait(self) -> int:
        if not self.exits:
            await asyncio.Event().wait()  # runs until stopped
        await asyncio.sleep(0.05)  # the console copy gets to run first
        return 0

    async def stop(self) -> None:
        self.stops += 1


class Output:
    """A ``sys.stdout`` whose binary buffer fails every write with ``error``."""

    def __init__(self, error: OSError) -> None:
        self.buffer = self
        self.error = error
        self.writes = 0

    def write(self, data: bytes) -> int:
        self.writes += 1
        raise self.error

    def flush(self) -> None:
        pass


def run(monkeypatch: pytest.MonkeyPatch, vm: FakeVm, out: Output) -> Any:
    async def fake_start(config: Any, use_jailer: bool | None = None) -> FakeVm:
        return vm

    monkeypatch.setattr(cli_vm, "start_firecracker", fake_start)
    monkeypatch.setattr(cli_vm.sys, "stdout", out)
    config = SimpleNamespace(vm_id=vm.vm_id)
    return asyncio.run(
        asyncio.wait_for(cli_vm.run_vm(config, force_unjailed=False, stats=False), 30)  # type: ignore[arg-type]
    )


def test_a_closed_stdout_stops_the_vm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``ironclaw vm run | head -1``: once the reader is gone the VM is stopped and cleaned
    up (it used to raise out of the clean-up and leave everything behind), exit 141."""
    vm = FakeVm(tmp_path / "console.log", b"READY\n", exits=False)
    out = Output(BrokenPipeError(errno.EPIPE, "Broken pipe"))
    assert run(monkeypatch, vm, out) == ExitCode.OUTPUT_CLOSED == 141
    assert vm.stops == 1
    assert out.writes == 1  # nothing is written after the pipe broke


def test_a_pipe_closed_after_the_guest_ended_keeps_its_status(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    vm = FakeVm(tmp_path / "console.log", b"READY\n", exits=True)
    out = Output(BrokenPipeError(errno.EPIPE, "Broken pipe"))
    assert run(monkeypatch, vm, out) in (ExitCode.OK, ExitCode.OUTPUT_CLOSED)
    assert vm.stops == 1


def test_any_console_copy_error_still_stops_the_vm(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    vm = FakeVm(tmp_path / "console.log", b"READY\n", exits=True)
    out = Output(OSError(errno.EIO, "I/O error"))
    with pytest.raises(OSError, match="I/O error"):
        run(monkeypatch, vm, out)
    assert vm.stops == 1


def test_vm_logs_follow_ends_when_stdout_is_closed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``vm logs -f web-1 | head -1``: the reader is gone, so following ends (exit 141)
    instead of reading on for as long as the VM lives."""
    import typer

    from ironclaw_orchestrator.cli import vm_stop

    console = tmp_path / "console.log"
    console.write_bytes(b"line 1\nline 2\n")
    record = SimpleNamespace(console_path=console, log_path=None)
    polls: list[int] = []

    class Registry:
        def get(self, vm_id: str) -> Any:
            polls.append(1)
            return record if len(polls) < 3 else None  # the VM stops at the third poll

    monkeypatch.setattr(vm_stop, "open_registry", Registry)
    monkeypatch.setattr(vm_stop, "get_record", lambda registry, vm_id: record)
    out = Output(BrokenPipeError(errno.EPIPE, "Broken pipe"))
    monkeypatch.setattr(vm_stop.sys, "stdout", out)
    with pytest.raises(typer.Exit) as exc:
        vm_stop.logs("web-1", follow=True, supervisor=False)
    assert exc.value.exit_code == ExitCode.OUTPUT_CLOSED
    assert (out.writes, polls) == (1, [])  # ended at the first failed write
