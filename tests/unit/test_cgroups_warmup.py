"""The no-op cgroup migration a start makes first, so that the jailer's own move does not
wait an RCU grace period (``vm/cgroups/warmup.py``): what it writes, where, and when not."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest
from fake_cgroupfs import FakeKernel

from ironclaw_orchestrator.vm.cgroups import CgroupLayout, warmup

V1 = ("cpu", "memory")


def v1_host(tmp_path: Path, *, root: str = "/") -> tuple[CgroupLayout, FakeKernel]:
    for c in V1:
        (tmp_path / c).mkdir()
        (tmp_path / c / "cgroup.procs").write_text("1\n")
        (tmp_path / c / "tasks").write_text("1\n")
    fs = FakeKernel(tmp_path)
    for c in V1:
        fs.mkdir(tmp_path / c / "svc")
    layout = CgroupLayout(
        mode="v1",
        v1_mounts={c: tmp_path / c for c in V1},
        unified_mount=None,
        unified_controllers=frozenset(),
        own_paths={c: "/svc" for c in V1},
        mount_roots={tmp_path / c: root for c in V1},
    )
    return layout, fs


def v2_host(tmp_path: Path) -> tuple[CgroupLayout, FakeKernel]:
    top = tmp_path / "unified"
    top.mkdir()
    (top / "cgroup.procs").write_text("1\n")
    (top / "cgroup.controllers").write_text("cpu memory\n")
    (top / "cgroup.subtree_control").write_text("")
    fs = FakeKernel(tmp_path)
    fs.mkdir(top / "svc")
    layout = CgroupLayout(
        mode="v2",
        v1_mounts={},
        unified_mount=top,
        unified_controllers=frozenset({"cpu", "memory"}),
        own_paths={"": "/svc"},
    )
    return layout, fs


def test_v1_moves_only_the_calling_thread_into_its_own_cgroup(tmp_path: Path) -> None:
    layout, fs = v1_host(tmp_path)
    proc = "5:memory:/svc\n4:cpu:/svc\n1:name=systemd:/\n"
    assert warmup.migrate_in_place(layout, fs, lambda: proc) is True
    tid = str(threading.get_native_id())
    assert fs.writes == [(tmp_path / "cpu" / "svc" / "tasks", tid)]  # a thread, not a process


def test_v1_inside_a_container_writes_where_the_mount_shows_it(tmp_path: Path) -> None:
    """A mount showing a sub path (a container without a cgroup namespace): the cgroup is
    found relative to it, or, if the mount does not show it, nothing is written."""
    layout, fs = v1_host(tmp_path, root="/outer")
    assert warmup.migrate_in_place(layout, fs, lambda: "4:cpu:/outer/svc\n5:memory:/outer/svc\n")
    assert fs.writes[0][0] == tmp_path / "cpu" / "svc" / "tasks"
    fs.writes.clear()
    assert not warmup.migrate_in_place(layout, fs, lambda: "4:cpu:/elsewhere\n5:memory:/x\n")
    assert fs.writes == []


def test_v2_moves_the_process_only_in_a_plain_domain_cgroup(tmp_path: Path) -> None:
    layout, fs = v2_host(tmp_path)
    svc = tmp_path / "unified" / "svc"
    assert warmup.migrate_in_place(layout, fs, lambda: "0::/svc\n") is True
    assert fs.writes == [(svc / "cgroup.procs", str(os.getpid()))]
    fs.writes.clear()
    (svc / "cgroup.type").write_text("threaded\n")  # its threads may sit in several cgroups
    assert warmup.migrate_in_place(layout, fs, lambda: "0::/svc\n") is False
    assert fs.writes == []
    (svc / "cgroup.type").write_text("domain threaded\n")  # a threaded subtree's domain
    assert warmup.migrate_in_place(layout, fs, lambda: "0::/svc\n") is False
    # The true root has no type file, and threaded children may hold our threads there.
    assert warmup.migrate_in_place(layout, fs, lambda: "0::/\n") is False
    assert fs.writes == []


def test_a_host_that_refuses_changes_nothing_and_raises_nothing(tmp_path: Path) -> None:
    layout, fs = v1_host(tmp_path)
    fs.fail[("tasks", None)] = 13
    assert warmup.migrate_in_place(layout, fs, lambda: "4:cpu:/svc\n") is False
    assert warmup.migrate_in_place(layout, fs, lambda: "garbage") is False

    def unreadable() -> str:
        raise FileNotFoundError(2, "No such file or directory", "/proc/thread-self/cgroup")

    assert warmup.migrate_in_place(layout, fs, unreadable) is False


async def test_one_warm_up_per_window_in_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of starts keeps the lock ready by itself: one warm-up per window, and never
    on the event loop's thread."""
    layout, fs = v1_host(tmp_path)
    monkeypatch.setattr(warmup, "_last_warm", -1.0)
    clock = [1000.0]
    monkeypatch.setattr(warmup.time, "monotonic", lambda: clock[0])
    threads: list[int] = []

    def own() -> str:
        threads.append(threading.get_native_id())
        return "4:cpu:/svc\n"

    first = warmup.warm_migration_lock(layout, fs, read_own=own)
    assert first is not None and await first is True
    clock[0] += warmup.WARM_WINDOW_S / 2
    assert warmup.warm_migration_lock(layout, fs, read_own=own) is None
    clock[0] += warmup.WARM_WINDOW_S
    again = warmup.warm_migration_lock(layout, fs, read_own=own)
    assert again is not None and await again is True
    assert len(threads) == 2 and threading.get_native_id() not in threads
    assert len(fs.writes) == 2
    await asyncio.sleep(0)


async def test_a_jailer_just_spawned_keeps_the_lock_warm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a burst, each jailer moves itself into its cgroups within a few ms of its spawn:
    the next starts need no warm-up (and so no thread hop for their cgroups)."""
    layout, fs = v1_host(tmp_path)
    monkeypatch.setattr(warmup, "_last_warm", -1.0)
    clock = [500.0]
    monkeypatch.setattr(warmup.time, "monotonic", lambda: clock[0])
    warmup.migration_coming()
    clock[0] += warmup.WARM_WINDOW_S / 2
    assert warmup.warm_migration_lock(layout, fs, read_own=lambda: "4:cpu:/svc\n") is None
    clock[0] += warmup.WARM_WINDOW_S
    later = warmup.warm_migration_lock(layout, fs, read_own=lambda: "4:cpu:/svc\n")
    assert later is not None and await later is True
