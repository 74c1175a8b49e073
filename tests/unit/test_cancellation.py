"""Cancellation at any await: rollbacks and stops finish, thread work settles first.

Deterministic stand-ins for the orderings that leak on a real host: a thread step that
finishes after the cancel, a second cancel during the rollback, a stop cancelled half-way
(its caller, or its own task as the event loop shuts down).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from standin_host import StandinHost, make_host

from ironclaw_orchestrator.errors import CleanupError
from ironclaw_orchestrator.vm import fswatch, jailer, lifecycle
from ironclaw_orchestrator.vm.cancelsafe import Resumable, ThreadSteps, finish
from ironclaw_orchestrator.vm.jailer import JailFile, _roll_back, start_with_jailer
from ironclaw_orchestrator.vm.lifecycle import VmmHandle
from ironclaw_orchestrator.vm.process import ChildProcess


async def test_finish_completes_the_rollback_through_repeated_cancels() -> None:
    done: list[str] = []

    async def rollback() -> None:
        for step in ("kill", "netns", "cgroups", "jail"):
            await asyncio.sleep(0.01)
            done.append(step)

    task = asyncio.ensure_future(finish(rollback()))
    for _ in range(3):  # a timeout, then a task group, then Ctrl-C
        await asyncio.sleep(0.012)
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert done == ["kill", "netns", "cgroups", "jail"]


async def test_finish_passes_result_and_error_when_not_cancelled() -> None:
    async def ok() -> int:
        return 7

    async def bad() -> None:
        raise CleanupError("VM x: left", ["jail"])

    assert await finish(ok()) == 7
    with pytest.raises(CleanupError):
        await finish(bad())


async def test_finish_keeps_a_timeout_a_timeout() -> None:
    """``asyncio.timeout`` still turns the re-raised cancellation into TimeoutError."""
    finished = asyncio.Event()

    async def slow_cleanup() -> None:
        await asyncio.sleep(0.05)
        finished.set()

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await finish(slow_cleanup())
    assert finished.is_set()


class Ledger:
    """Stands in for JailResources: what a thread step made, and when release ran."""

    def __init__(self) -> None:
        self.made: list[str] = []
        self.seen_at_release: list[str] | None = None

    def release(self) -> None:
        self.seen_at_release = list(self.made)
        self.made.clear()


async def test_rollback_waits_for_the_thread_step_even_when_cancelled_again() -> None:
    """The issue's netns leak: a step still creating things while the rollback removes."""
    steps, res = ThreadSteps(), Ledger()
    go = threading.Event()

    def make_netns() -> None:
        go.wait(10)
        res.made.append("netns ironclaw-x")  # arrives after the cancel

    async def start() -> None:
        try:
            await steps.run(make_netns)
        except BaseException:
            await finish(_roll_back(steps, None, None, res))  # type: ignore[arg-type]
            raise

    task = asyncio.ensure_future(start())
    await asyncio.sleep(0.02)
    task.cancel()  # first cancel: the rollback starts, the step is still in its thread
    await asyncio.sleep(0.02)
    task.cancel()  # second cancel, during the rollback
    assert res.seen_at_release is None  # not released under the step's feet
    go.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert res.seen_at_release == ["netns ironclaw-x"] and res.made == []


async def test_resumable_retries_after_a_failure_and_joins_a_running_one() -> None:
    runs: list[int] = []
    gate = asyncio.Event()

    async def op() -> int:
        runs.append(len(runs))
        await gate.wait()
        if len(runs) == 1:
            raise CleanupError("VM x: cgroup busy", ["cgroup"])
        return len(runs)

    once: Resumable[int] = Resumable()
    first = asyncio.ensure_future(once.run(op))
    second = asyncio.ensure_future(once.run(op))  # joins the same run
    await asyncio.sleep(0)
    gate.set()
    for fut in (first, second):
        with pytest.raises(CleanupError):
            await fut
    assert runs == [0] and not once.done
    assert await once.run(op) == 2 and once.done
    assert await once.run(op) == 2 and runs == [0, 1]  # done: not run again


# --------------------------------------------------------------------------- stop


class FakeApi:
    """A guest that ignores Ctrl-Alt-Del (the VMM must be killed)."""

    def __init__(self) -> None:
        self.closed = 0

    async def send_ctrl_alt_del(self) -> None:
        return None

    async def aclose(self) -> None:
        self.closed += 1


class SleepVmm(VmmHandle):
    """A real child process (``sleep``) standing in for the VMM; counts releases."""

    def __init__(self, tmp_path: Path) -> None:
        process = ChildProcess.spawn(["/bin/sleep", "60"], stdout_path=tmp_path / "out")
        super().__init__(
            vm_id="x",
            process=process,
            api=FakeApi(),
            console_path=tmp_path / "out",  # type: ignore[arg-type]
        )
        self.booted = True
        self.releases: list[bool] = []

    def _release(self) -> None:
        self.releases.append(self.process.alive)


async def test_cancelled_stop_keeps_running_and_a_second_call_finishes(tmp_path: Path) -> None:
    vmm = SleepVmm(tmp_path)
    stopping = asyncio.ensure_future(vmm.stop(timeout_s=0.3))
    await asyncio.sleep(0.05)  # waiting for the guest to honour Ctrl-Alt-Del
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert vmm.process.alive  # the caller left; the stop goes on
    assert await vmm.stop() == -9
    assert vmm.releases == [False]  # released once, after the VMM was gone
    assert await vmm.stop() == -9 and vmm.releases == [False]  # done: idempotent


async def test_stop_cut_short_kills_then_a_second_call_resumes(tmp_path: Path) -> None:
    """The stop's own task cancelled (the event loop shutting down): nothing outlives it."""
    vmm = SleepVmm(tmp_path)
    caller = asyncio.ensure_future(vmm.stop(timeout_s=10))
    await asyncio.sleep(0.05)
    task: Any = vmm._stopping._task
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert vmm.releases == [False]  # killed before anything was removed
    # Resumed: straight to SIGKILL (no second graceful wait), release again (idempotent).
    assert await asyncio.wait_for(vmm.stop(timeout_s=10), 5) == -9
    assert vmm.releases == [False, False] and not vmm.process.alive


async def test_a_start_is_a_coroutine_for_task_groups() -> None:
    """``TaskGroup.create_task(start_firecracker(cfg))``: the way groups cancel siblings."""
    from ironclaw_orchestrator.vm.context import awaitable_context

    @awaitable_context
    async def start(vm_id: str) -> Any:
        await asyncio.sleep(0.01)
        return vm_id

    async with asyncio.TaskGroup() as group:
        task = group.create_task(start("a"))
    assert task.result() == "a"


async def test_snapshot_cancelled_while_sealing_leaves_no_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seal (a thread) made the snapshot but returns after the cancel: the snapshot
    must not survive the cancelled call."""
    import os

    from ironclaw_orchestrator.vm import VmConfig
    from ironclaw_orchestrator.vm import snapshot as snap_mod
    from ironclaw_orchestrator.vm.binaries import Version

    go = threading.Event()

    def slow_seal(work: Path, dest: Path, **kw: Any) -> Any:
        os.rename(work, dest)  # what the real seal ends with: made, not yet returned
        go.wait(10)
        return "sealed"

    class Api:
        async def create_snapshot(self, body: object) -> None:
            return None

    monkeypatch.setattr(snap_mod, "seal_snapshot", slow_seal)
    cfg = VmConfig(vm_id="x", kernel_path="/k", rootfs_path=None)
    source = snap_mod.SnapshotSource(
        Api(),
        tmp_path / "root",
        os.getuid(),
        os.getgid(),
        Version(1, 0, 0),
        cfg,  # type: ignore[arg-type]
    )
    dest = tmp_path / "snap"
    task = asyncio.ensure_future(snap_mod.snapshot_vm(source, dest, was_paused=True))
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.sleep(0.02)
    go.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not dest.exists()
    assert list((tmp_path / "root").iterdir()) == []  # its work directory is gone too


# --------------------------------------------------------------------------- the real start


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandinHost]:
    yield from make_host(monkeypatch, 1)


def standin_files(host: StandinHost) -> list[JailFile]:
    return [JailFile(host.images / "vmlinux", PurePosixPath("/vmlinux"))]


async def test_start_cancelled_twice_while_a_thread_step_runs_leaves_nothing(
    host: StandinHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real start_with_jailer: cancelled while its cgroups are prepared in a thread (the
    locked path), and again while the rollback waits for that thread; the step then ends,
    making them."""
    before = host.snapshot()
    entered, go = threading.Event(), threading.Event()
    real_prepare = jailer.cg.VmCgroups.prepare_locked

    def slow_prepare(self: Any) -> None:
        entered.set()
        go.wait(10)
        real_prepare(self)

    monkeypatch.setattr(jailer.cg, "warm_migration_lock", lambda *a, **k: None)
    monkeypatch.setattr(jailer.cg.VmCgroups, "prepare_lock_free", lambda self: False)
    monkeypatch.setattr(jailer.cg.VmCgroups, "prepare_locked", slow_prepare)
    task = asyncio.ensure_future(
        start_with_jailer(host.jailer_config(), files=standin_files(host), ready_timeout_s=30)
    )
    assert await asyncio.to_thread(entered.wait, 10)
    task.cancel()
    await asyncio.sleep(0.02)
    task.cancel()  # during the rollback, which waits for the step
    await asyncio.sleep(0.02)
    assert host.cgroup_dirs() == []  # not made yet: the step is still blocked
    go.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert host.snapshot() == before


async def test_start_cancelled_at_every_step_leaves_nothing(
    host: StandinHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancel after 0, 1, 2, ... event-loop turns until the start wins: each turn is one
    more await reached (run dir, jail, cgroups, spawn, adoption, readiness: the wait on the
    socket's watch too)."""
    before = host.snapshot()
    watched: list[object] = []
    real_woken = lifecycle._woken

    async def woken(*args: Any) -> None:
        watched.append(args)
        await real_woken(*args)

    monkeypatch.setattr(lifecycle, "_woken", woken)
    turns = 0
    while True:
        task = asyncio.ensure_future(
            start_with_jailer(host.jailer_config(), files=standin_files(host), ready_timeout_s=30)
        )
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()
        try:
            vmm = await task
        except asyncio.CancelledError:
            assert host.snapshot() == before, f"cancelled after {turns} turns"
            turns += 1 if turns < 40 else max(1, turns // 4)
            continue
        await vmm.stop()
        break
    assert host.snapshot() == before
    assert turns > 3  # the sweep went past the first awaits
    assert watched  # ... and reached the wait for the socket (the stand-in makes it late)
    inst = fswatch._instances.get(asyncio.get_running_loop())
    assert inst is not None and not inst._waiters and not inst._refs  # no watch left
