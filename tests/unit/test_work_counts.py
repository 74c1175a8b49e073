"""Work per start and stop, counted (never timed), against the stand-in jailer.

Guards the per-VM CPU of the start/stop path (issue 10): host facts and derived values are
computed once, not once per step that needs them.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from counting import counting
from standin_host import StandinHost, make_host

from ironclaw_orchestrator import procfs
from ironclaw_orchestrator.registry import Registry
from ironclaw_orchestrator.vm import jailer, jailer_config, seccomp, start_firecracker
from ironclaw_orchestrator.vm.cgroups import VmCgroups
from ironclaw_orchestrator.vm.config import JailerConfig
from ironclaw_orchestrator.vm.process import ChildProcess
from ironclaw_orchestrator.vm.resources import INLINE_REMOVAL_BYTES


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandinHost]:
    monkeypatch.delenv("IRONCLAW_REQUIRE_SANDBOX", raising=False)
    yield from make_host(monkeypatch, 1)


async def test_one_stat_read_one_oom_read_one_exec_resolution_per_lifecycle(
    host: StandinHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = Registry(host.root / "state")
    stats = counting(monkeypatch, procfs, "read_stat")
    ooms = counting(monkeypatch, VmCgroups, "oom_kills")
    resolved = counting(monkeypatch, jailer_config, "real_path")
    host.control(after_start="exit:0")
    vm = await start_firecracker(host.vm_config(), registry=registry, ready_timeout_s=30)
    try:
        # The VMM's start time (its identity for the record) is read; the jailer's, which
        # forks the VMM and exits, is not. (The registry may read the orchestrator's own.)
        assert vm.pid in stats
        vm_reads = [pid for pid in stats if pid != os.getpid()]
        assert vm_reads == [vm.pid], stats
        # The exec file's name (a realpath) is resolved by the input check and the start,
        # not by every step that derives a jail path from it.
        assert len(resolved) <= 2, resolved
        await vm.start_instance()
        assert await vm.wait() == 0
    finally:
        await vm.stop()
    assert len(ooms) == 1  # read once the VMM exited; stop() does not read it again


async def test_jailer_start_time_is_not_read() -> None:
    reads = []
    real = procfs.read_stat

    def counted(pid: int, proc: Path = procfs.PROC) -> procfs.ProcStat | None:
        reads.append(pid)
        return real(pid, proc)

    mp = pytest.MonkeyPatch()
    mp.setattr(procfs, "read_stat", counted)
    try:
        child = ChildProcess.spawn(["/bin/sleep", "5"], stdout_path=Path("/dev/null"))
        assert reads == []
        start = child.start_time
        assert start is not None and reads == [child.pid]
        assert child.start_time == start and reads == [child.pid]  # read once
        child.kill()
        await child.wait()
        late = ChildProcess.spawn(["/bin/true"], stdout_path=Path("/dev/null"))
        await late.wait()
        # Asked first after the reap: the pid may be reused, so no answer rather than a wrong one.
        assert late.start_time is None and late.pid not in reads
    finally:
        mp.undo()


def test_jail_paths_are_derived_once_and_follow_their_inputs(tmp_path: Path) -> None:
    cfg = JailerConfig(jailer_id="a", chroot_base_dir=tmp_path, exec_file=tmp_path / "fc-1")
    assert cfg.jail_dir == tmp_path / "fc-1" / "a"
    assert cfg.jail_dir is cfg.jail_dir  # computed once per object
    assert cfg.api_socket_path == tmp_path / "fc-1/a/root/run/firecracker.socket"
    cfg.jailer_id = "b"
    assert cfg.jail_dir == tmp_path / "fc-1" / "b"
    assert cfg.chroot_dir == tmp_path / "fc-1/b/root"
    cfg.api_sock = PurePosixPath("/api.sock")
    assert cfg.api_socket_path == tmp_path / "fc-1/b/root/api.sock"
    cfg.exec_file = tmp_path / "fc-2"
    assert cfg.exec_file_name == "fc-2"
    assert cfg.api_socket_path == tmp_path / "fc-2/b/root/api.sock"
    moved = cfg.model_copy(update={"chroot_base_dir": tmp_path / "other"})
    assert moved.jail_dir == tmp_path / "other/fc-2/b"
    assert cfg.jail_dir == tmp_path / "fc-2/b"  # the original keeps its own
    renamed = cfg.model_copy(update={"jailer_id": "c"})
    assert renamed.chroot_dir == tmp_path / "fc-2/c/root"
    same = cfg.model_copy(update={"uid": 4242})
    assert same.jail_dir == cfg.jail_dir and same == cfg.model_copy(update={"uid": 4242})
    assert "jail_dir" not in cfg.model_dump()


def test_seccomp_status_reads_one_file_per_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = tmp_path / "7" / "task"
    for tid, text in {
        7: "Name:\tfirecracker\nSeccomp:\t2\nSeccomp_filters:\t1\n",
        8: "Seccomp:\t2\n",  # the line first ...
        9: "Name:\tfc_vcpu 0\nSeccomp:\t0",  # ... or last, without a newline
        10: "Name:\tfc_api\n",  # no such line: not counted
    }.items():
        (task / str(tid)).mkdir(parents=True)
        (task / str(tid) / "status").write_text(text)
    (task / "11").mkdir()  # a thread that exited between the listing and the read
    opened = counting(monkeypatch, seccomp.os, "open")
    status = seccomp.read_seccomp_status(7, tmp_path)
    assert status.threads == {7: 2, 8: 2, 9: 0}
    assert len(opened) == 5  # one open per listed thread, nothing else


async def test_thread_hops_only_where_work_may_wait(
    host: StandinHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a loaded host a hop to a worker thread and back costs more than the short, bounded
    work of a start or a stop (the GIL changes hands at each of the thread's system calls),
    so that work runs on the event loop. Only the first start in a process waits for a hop:
    its cgroup parents are made under the host lock, which may wait for another process. A
    stop whose jail holds a big file hops to remove it. (The namespace helper threads' own
    hops are counted in test_netns_workers.)"""
    loop = asyncio.get_running_loop()
    hops: list[object] = []
    real = loop.run_in_executor

    def counted(executor: Any, fn: Any, *args: Any) -> Any:
        hops.append(getattr(fn, "__name__", fn))
        return real(executor, fn, *args)

    monkeypatch.setattr(loop, "run_in_executor", counted)
    # Counted apart (test_the_vm_cgroups_are_made_off_the_loop_while_a_warm_up_is_pending).
    monkeypatch.setattr(jailer.cg, "warm_migration_lock", lambda *a, **k: None)
    registry = Registry(host.root / "state")
    before = host.snapshot()

    async def lifecycle(big_file: bool = False) -> None:
        host.control(after_start="exit:0")
        vm = await start_firecracker(host.vm_config(), registry=registry, ready_timeout_s=30)
        try:
            await vm.start_instance()
            assert await vm.wait() == 0
            assert host.fs is not None
            host.fs.exited(vm.pid)  # as the kernel does (the fake cannot see it)
            if big_file:  # as a snapshot's memory file would be
                (host.jail() / "root" / "mem").write_bytes(b"x" * INLINE_REMOVAL_BYTES)
        finally:
            await vm.stop()

    def waited() -> list[object]:
        return hops

    await lifecycle()
    assert waited() == ["prepare_locked"], hops  # the stop ran on the event loop
    hops.clear()
    await lifecycle()
    assert waited() == [], hops  # the cgroup parents exist: no hop at all
    hops.clear()
    await lifecycle(big_file=True)
    assert waited() == ["_release"], hops
    assert host.snapshot() == before


async def test_the_vm_cgroups_are_made_off_the_loop_while_a_warm_up_is_pending(
    host: StandinHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pending cgroup move holds the kernel's cgroup_mutex through an RCU grace period and
    every cgroup mkdir needs it: while the start's own warm-up is pending, its cgroups are
    made in a worker thread, not on the event loop (found by review: the loop waited ~7 ms).
    With the lock warm already (no warm-up), they are made on the loop, without a hop."""
    loop = asyncio.get_running_loop()
    where: list[tuple[str, bool]] = []
    real_free, real_prepare = VmCgroups.prepare_lock_free, VmCgroups.prepare

    def free(self: VmCgroups) -> bool:
        where.append(("lock-free", threading.current_thread() is threading.main_thread()))
        return real_free(self)

    def prepare(self: VmCgroups) -> None:
        where.append(("prepare", threading.current_thread() is threading.main_thread()))
        real_prepare(self)

    monkeypatch.setattr(VmCgroups, "prepare_lock_free", free)
    monkeypatch.setattr(VmCgroups, "prepare", prepare)
    pending: asyncio.Future[bool] = loop.create_future()
    monkeypatch.setattr(jailer.cg, "warm_migration_lock", lambda *a, **k: pending)
    registry = Registry(host.root / "state")
    host.control(after_start="exit:0")
    vm = await start_firecracker(host.vm_config(), registry=registry, ready_timeout_s=30)
    await vm.stop()
    assert where == [("prepare", False)]
    where.clear()
    monkeypatch.setattr(jailer.cg, "warm_migration_lock", lambda *a, **k: None)
    vm = await start_firecracker(host.vm_config(), registry=registry, ready_timeout_s=30)
    await vm.stop()
    assert where == [("lock-free", True)]
    pending.cancel()
