"""The console terminal through the stand-in jailer: the budget reaches the VM, the output
tail reaches errors, and no terminal or file descriptor outlives a stop or a rollback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import PurePosixPath

import pytest
from standin_host import StandinHost, make_host

from ironclaw_orchestrator.errors import VmExitedError
from ironclaw_orchestrator.vm import fswatch
from ironclaw_orchestrator.vm.cgroups.lock import kept_fds
from ironclaw_orchestrator.vm.jailer import JailFile, start_with_jailer


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandinHost]:
    yield from make_host(monkeypatch, 2)


def files(host: StandinHost) -> list[JailFile]:
    return [JailFile(host.images / "vmlinux", PurePosixPath("/vmlinux"))]


def open_fds() -> set[str]:
    kept = {str(fd) for fd in kept_fds()}  # host lock files stay open per process, not per VM
    kept |= {str(fd) for fd in fswatch.kept_fds()}  # so does the readiness inotify instance
    return {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if fd not in kept and os.path.exists(f"/proc/self/fd/{fd}")}  # fmt: skip


async def test_the_budget_reaches_the_vm_and_stop_closes_the_terminal(host: StandinHost) -> None:
    before = open_fds()
    vmm = await start_with_jailer(
        host.jailer_config(), files=files(host), ready_timeout_s=30, console_limit_bytes=20000
    )
    try:
        assert vmm.console is not None and vmm.console.log.limit == 20000
        assert any(p.startswith("/dev/ptmx") or p.startswith("/dev/pts/") for p in open_fds())
    finally:
        await vmm.stop()
    assert open_fds() == before
    assert vmm.console.dropped == 0


async def test_a_failed_start_quotes_the_output_and_closes_the_terminal(
    host: StandinHost,
) -> None:
    before = open_fds()
    host.control(fail="exit-before-socket")
    with pytest.raises(VmExitedError, match="failed before its socket") as info:
        await start_with_jailer(host.jailer_config(), files=files(host), ready_timeout_s=30)
    assert "stand-in firecracker sa-1 started" in info.value.output_tail
    assert open_fds() == before
