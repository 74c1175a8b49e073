"""Work counts of a VM's cgroups per lifecycle: ledger writes, lock-file opens, reads.

Each count guards a cut made for start-up cost (per-VM orchestrator CPU): on a host whose /run
is a disk file system, every ledger rewrite allocates and frees an inode, and every lock use
used to open the lock file. Counts, never timings.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
from fake_cgroupfs import FakeKernel

from ironclaw_orchestrator.vm.cgroups import (
    CgroupLayout,
    HostLock,
    VmCgroups,
    cgroup_settings,
    ledger,
    lock,
    release_chains,
)
from ironclaw_orchestrator.vm.config import JailerConfig

V1 = ("cpu", "cpuacct", "memory")


@pytest.fixture
def host(tmp_path: Path) -> tuple[CgroupLayout, FakeKernel, Path]:
    """v1: own memory cgroup /process_api/abc, own cpu and cpuacct at the root: a VM needs
    process_api, process_api/abc and .../ironclaw in cpu and cpuacct, ironclaw in memory."""
    root = tmp_path / "cg"
    for c in V1:
        (root / c).mkdir(parents=True)
        (root / c / "cgroup.procs").write_text("1\n")
    fs = FakeKernel(root)
    fs.mkdir(root / "memory" / "process_api")
    fs.mkdir(root / "memory" / "process_api" / "abc")
    layout = CgroupLayout(
        mode="v1",
        v1_mounts={c: root / c for c in V1},
        unified_mount=None,
        unified_controllers=frozenset(),
        own_paths={"cpu": "/", "cpuacct": "/", "memory": "/process_api/abc"},
    )
    return layout, fs, tmp_path / "run" / "cgroup.lock"


def vm(host: tuple[CgroupLayout, FakeKernel, Path], vm_id: str) -> VmCgroups:
    layout, fs, lock_path = host
    settings = cgroup_settings(JailerConfig(memory_limit_mb=128), 1, None)
    return VmCgroups.plan(layout, 1, vm_id, settings, None, lock_path=lock_path, fs=fs)


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every ledger rewrite, as the list it wrote."""
    seen: list[list[str]] = []
    real = ledger._write

    def counting(path: Path, entries: dict[str, str | None]) -> None:
        seen.append(sorted(entries))
        real(path, entries)

    monkeypatch.setattr(ledger, "_write", counting)
    return seen


def listed(lock_path: Path) -> set[str]:
    path = ledger.ledger_path(lock_path)
    if not path.exists():
        return set()
    return {line for line in path.read_text().splitlines() if line.startswith("/")}


class Counts:
    """Host work per step: lock acquisitions, ``mkdir``/``rmdir`` calls (any directory)."""

    def __init__(self, fs: FakeKernel, monkeypatch: pytest.MonkeyPatch) -> None:
        self.locks = self.mkdirs = self.rmdirs = 0
        real_enter, real_mkdir, real_rmdir = HostLock.__enter__, fs.mkdir, fs.rmdir

        def enter(lock: HostLock) -> HostLock:
            self.locks += 1
            return real_enter(lock)

        def mkdir(path: Path) -> None:
            self.mkdirs += 1
            real_mkdir(path)

        def rmdir(path: Path) -> None:
            self.rmdirs += 1
            real_rmdir(path)

        monkeypatch.setattr(HostLock, "__enter__", enter)
        fs.mkdir = mkdir  # type: ignore[method-assign]
        fs.rmdir = rmdir  # type: ignore[method-assign]

    def take(self) -> tuple[int, int, int]:
        out = (self.locks, self.mkdirs, self.rmdirs)
        self.locks = self.mkdirs = self.rmdirs = 0
        return out


def test_prepare_records_its_intermediates_in_one_write_before_making_them(
    host: tuple[CgroupLayout, FakeKernel, Path], writes: list[list[str]]
) -> None:
    _, fs, lock_path = host
    made_when_written: list[bool] = []
    real_mkdir = fs.mkdir

    def mkdir(path: Path) -> None:
        # Record before make: when a directory is made, the ledger already lists it.
        if not path.name.startswith("vm"):
            made_when_written.append(str(path) in listed(lock_path))
        real_mkdir(path)

    fs.mkdir = mkdir  # type: ignore[method-assign]
    a = vm(host, "vm1")
    a.prepare()
    intermediates = {str(p) for p in a.created if not p.name.startswith("vm")}
    assert len(intermediates) == 7  # 3 in cpu, 3 in cpuacct, 1 in memory
    assert writes == [sorted(intermediates)]
    assert made_when_written == [True] * 7
    assert listed(lock_path) == intermediates  # never a directory we did not create


def test_sequential_lifecycles_after_the_first_only_make_and_remove_their_own(
    host: tuple[CgroupLayout, FakeKernel, Path],
    writes: list[list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The parent chain stays while this process runs: each VM after the first makes and
    removes its 3 directories (cpu, cpuacct, memory) and nothing else: no intermediate, no
    ledger write, no host lock. The process's exit removes the chain (one lock, one write)."""
    _, fs, lock_path = host
    before = {p for p in fs.root.rglob("*") if p.is_dir()}
    counts = Counts(fs, monkeypatch)
    first = vm(host, "vm0")
    first.prepare()
    first.remove()
    # A lock-free mkdir that fails (no parent yet), then the chain (7 intermediates) is made
    # under the lock, with the VM's 3; only those 3 are removed.
    assert counts.take() == (1, 1 + 7 + 3, 3)
    assert len(writes) == 1
    for n in range(1, 4):
        a = vm(host, f"vm{n}")
        a.prepare()
        a.remove()
        assert counts.take() == (0, 3, 3)
    assert len(writes) == 1
    assert len(listed(lock_path)) == 7
    release_chains([lock_path])  # what the exit hook does
    assert counts.take() == (1, 0, 7)
    assert len(writes) == 2
    assert listed(lock_path) == set()
    assert {p for p in fs.root.rglob("*") if p.is_dir()} == before
    release_chains([lock_path])  # idempotent: nothing kept, nothing done
    assert counts.take() == (0, 0, 0)


def test_a_vm_that_needs_no_new_directory_does_not_write_the_ledger(
    host: tuple[CgroupLayout, FakeKernel, Path], writes: list[list[str]]
) -> None:
    lock_path = host[2]
    first = vm(host, "vm1")
    first.prepare()
    assert len(writes) == 1
    second = vm(host, "vm2")
    second.prepare()
    second.remove()  # the intermediates are busy with vm1: nothing changes
    assert len(writes) == 1
    first.remove()  # the chain is kept
    assert len(writes) == 1
    release_chains([lock_path])
    assert len(writes) == 2
    assert listed(lock_path) == set()


def test_an_intermediate_made_by_someone_else_meanwhile_is_not_listed(
    host: tuple[CgroupLayout, FakeKernel, Path], writes: list[list[str]]
) -> None:
    """Missing when looked up, there when made (not by ironclaw, which holds the lock): not
    ours, so dropped from the ledger again and never removed."""
    _, fs, lock_path = host
    theirs = fs.root / "cpu" / "process_api"
    real_mkdir = fs.mkdir

    def mkdir(path: Path) -> None:
        if path == theirs and not path.exists():
            real_mkdir(path)  # another program wins the race
        real_mkdir(path)

    fs.mkdir = mkdir  # type: ignore[method-assign]
    a = vm(host, "vm1")
    a.prepare()
    assert theirs not in a.created
    assert str(theirs) not in listed(lock_path)
    assert len(writes) == 2  # recorded with the others, then dropped
    a.remove()
    release_chains([lock_path])
    assert theirs.is_dir()  # never ours: left alone
    assert listed(lock_path) == set()


def test_an_empty_vm_cgroup_is_removed_without_reading_its_processes(
    host: tuple[CgroupLayout, FakeKernel, Path],
) -> None:
    _, fs, _ = host
    a = vm(host, "vm1")
    a.prepare()
    reads: list[Path] = []
    real_read = fs.read

    def read(path: Path) -> str:
        reads.append(path)
        return real_read(path)

    fs.read = read  # type: ignore[method-assign]
    a.remove()
    assert not any(p.name in ("cgroup.procs", "tasks") for p in reads)
    assert fs.killed == []
    assert not any(p.exists() for p in a.paths.values())


def test_a_vm_cgroup_with_processes_is_still_drained(
    host: tuple[CgroupLayout, FakeKernel, Path],
) -> None:
    _, fs, _ = host
    a = vm(host, "vm1")
    a.prepare()
    a.attach(4242, everywhere=True)
    fs.mkdir(a.paths["memory"] / "child")  # a child cgroup keeps the fast rmdir busy too
    a.remove(timeout_s=5)
    assert set(fs.killed) == {4242}  # v1 kills again on each pass
    assert not any(p.exists() for p in a.paths.values())


def test_the_lock_file_is_opened_once_per_process(
    host: tuple[CgroupLayout, FakeKernel, Path],
) -> None:
    _, _, lock_path = host
    for n in range(3):
        a = vm(host, f"vm{n}")
        a.prepare()
        a.remove()
    assert lock.open_count(lock_path) == 1


def test_a_deleted_lock_file_is_opened_again(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    with HostLock(path):
        pass
    path.unlink()  # e.g. /run cleaned: our descriptor now locks a file nobody else sees
    with HostLock(path):
        assert path.exists()
    assert lock.open_count(path) == 2


def test_the_lock_excludes_threads_of_one_process(tmp_path: Path) -> None:
    path = tmp_path / "t.lock"
    entered = threading.Event()

    def other() -> None:
        with HostLock(path):
            entered.set()

    with HostLock(path):
        t = threading.Thread(target=other)
        t.start()
        t.join(0.2)
        assert t.is_alive() and not entered.is_set()
    t.join(30)
    assert entered.is_set()


def test_a_forked_child_does_not_share_the_parents_lock(tmp_path: Path) -> None:
    """flock belongs to the open file description, which a child inherits: reusing it, the
    child would "hold" the lock its parent holds. It must open its own."""
    path = tmp_path / "f.lock"
    with HostLock(path):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit code
            code = 1
            try:
                entry = lock._table.get(path)
                fd = entry.open()
                try:
                    import fcntl

                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    code = 0 if entry.opens == 1 else 2  # excluded, through its own file
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_remove_rollback_after_a_failed_mkdir_unlists_what_was_never_made(
    host: tuple[CgroupLayout, FakeKernel, Path],
) -> None:
    _, fs, lock_path = host
    real_mkdir = fs.mkdir

    def mkdir(path: Path) -> None:
        if path.parent.name == "cpuacct":
            raise OSError(errno.EACCES, "denied", str(path))
        real_mkdir(path)

    fs.mkdir = mkdir  # type: ignore[method-assign]
    before = {p for p in fs.root.rglob("*") if p.is_dir()}
    with pytest.raises(Exception, match="EACCES"):
        vm(host, "vm1").prepare()
    assert listed(lock_path) == set()
    assert {p for p in fs.root.rglob("*") if p.is_dir()} == before


def test_v2_sequential_lifecycles_after_the_first_only_make_and_remove_their_own(
    tmp_path: Path, writes: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    u = tmp_path / "cg" / "unified"
    u.mkdir(parents=True)
    (u / "cgroup.controllers").write_text("cpu memory\n")
    (u / "cgroup.subtree_control").write_text("cpu memory\n")
    (u / "cgroup.procs").write_text("1\n")
    fs = FakeKernel(tmp_path / "cg")
    fs.mkdir(u / "svc")
    layout = CgroupLayout("v2", {}, u, frozenset({"cpu", "memory"}), {"": "/svc"})
    settings = cgroup_settings(JailerConfig(), 2, None)
    lock_path = tmp_path / "l"
    counts = Counts(fs, monkeypatch)
    for n in range(3):
        a = VmCgroups.plan(layout, 2, f"vm{n}", settings, None, lock_path=lock_path, fs=fs)
        a.prepare()
        made = [u / "svc/ironclaw"] if n == 0 else []
        assert a.created == [*made, u / f"svc/ironclaw/vm{n}"]
        assert listed(lock_path) == {str(u / "svc/ironclaw")}
        assert set((u / "svc/ironclaw/cgroup.subtree_control").read_text().split()) == {
            "cpu",
            "memory",
        }
        a.remove()
        assert counts.take() == ((1, 1 + 2, 1) if n == 0 else (0, 1, 1))  # see the v1 test
        assert len(writes) == 1
    release_chains([lock_path])
    assert counts.take() == (1, 0, 1)
    assert len(writes) == 2
    assert not (u / "svc/ironclaw").exists()
    assert listed(lock_path) == set()


def test_detect_layout_reuses_its_result_until_own_cgroups_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ironclaw_orchestrator.vm.cgroups import layout as layout_mod

    first = layout_mod.detect_layout()
    assert layout_mod.detect_layout() is first  # nothing changed: nothing rebuilt
    real = layout_mod._read_own()
    monkeypatch.setattr(layout_mod, "_read_own", lambda: real + b"99:pids:/moved\n")
    moved = layout_mod.detect_layout()
    assert moved is not first and moved.own_paths["pids"] == "/moved"


def test_the_oom_count_is_read_once_after_exit() -> None:
    """wait() and stop() both run the exit hook, both after the VMM exited."""
    from types import SimpleNamespace

    from ironclaw_orchestrator.vm.jailer import JailerProcess

    reads: list[int] = []

    class Cgroups:
        def oom_kills(self) -> int:
            reads.append(1)
            return 2

    proc = JailerProcess.__new__(JailerProcess)
    proc.resources = SimpleNamespace(cgroups=Cgroups())  # type: ignore[assignment]
    proc.oom_killed = False
    proc._oom_read = False
    proc._after_exit()
    proc._after_exit()
    assert reads == [1] and proc.oom_killed


def test_lock_files_kept_open_are_bounded(tmp_path: Path) -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    for n in range(3 * lock._MAX_OPEN):
        with HostLock(tmp_path / f"{n}.lock"):
            pass
    assert len(lock._table.files) <= lock._MAX_OPEN
    assert len(os.listdir("/proc/self/fd")) <= fds_before + lock._MAX_OPEN


def test_a_forked_child_closes_the_inherited_lock_files_at_once(tmp_path: Path) -> None:
    """A child that never takes the lock (a library's short-lived helper) must not keep the
    parent's lock file open: if the parent died holding it, the host lock would stay held
    until the child exits. The at-fork hook closes them before the child runs any code."""
    path = tmp_path / "f.lock"
    with HostLock(path):
        held_fd = lock._table.files[path].fd
        assert held_fd is not None
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit code
            code = 1
            try:
                try:
                    os.fstat(held_fd)
                    code = 2  # still open in the child
                except OSError:
                    code = 0 if not lock._table.files else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_plan_is_decided_once_per_configuration_and_layout(
    host: tuple[CgroupLayout, FakeKernel, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the id differs between VMs of one configuration: the controllers, mounts, parent
    and attach keys are decided once, and again for a new layout object (detect_layout
    makes one whenever the host's layout changes) or another configuration."""
    import dataclasses

    from ironclaw_orchestrator.vm.cgroups import planning

    decided: list[int] = []
    real = planning._decide
    monkeypatch.setattr(planning, "_decide", lambda *a: (decided.append(1), real(*a))[1])
    monkeypatch.setattr(planning, "_plans", {})
    a, b = vm(host, "vm1"), vm(host, "vm2")
    assert len(decided) == 1
    assert a.parent == b.parent == "process_api/abc/ironclaw"
    assert a.paths["memory"].name == "vm1" and b.paths["memory"].name == "vm2"
    assert a.mounts is not b.mounts and a.own is not b.own  # shared plan, own copies
    layout, fs, lock_path = host
    settings = cgroup_settings(JailerConfig(memory_limit_mb=128), 1, None)
    moved = dataclasses.replace(layout, own_paths={**layout.own_paths, "memory": "/other"})
    c = VmCgroups.plan(moved, 1, "vm3", settings, None, lock_path=lock_path, fs=fs)
    assert len(decided) == 2 and c.parent == "other/ironclaw"
    d = VmCgroups.plan(layout, 1, "vm4", settings, "elsewhere", lock_path=lock_path, fs=fs)
    assert len(decided) == 3 and d.parent == "elsewhere" and d.explicit_parent
    with pytest.raises(Exception, match="vm_id"):
        VmCgroups.plan(layout, 1, "bad/id", settings, None, lock_path=lock_path, fs=fs)


def test_the_lock_free_steps_say_when_the_locked_ones_are_needed(
    host: tuple[CgroupLayout, FakeKernel, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start prepares on its event loop what needs no lock and no wait, and a stop removes
    so: ``False`` (nothing left made, nothing waited for) hands the step to the locked path
    in a thread: the first VM (no parent chain yet), a VM cgroup still holding a process."""
    _, fs, _ = host
    counts = Counts(fs, monkeypatch)
    first = vm(host, "vm0")
    assert first.prepare_lock_free() is False
    assert counts.take() == (0, 1, 0) and first.created == [] and not first.prepared
    first.prepare_locked()
    assert counts.take() == (1, 7 + 3, 0) and first.prepared
    assert first.remove_lock_free() is True
    assert counts.take() == (0, 0, 3) and not first.prepared
    second = vm(host, "vm1")
    assert second.prepare_lock_free() is True
    assert counts.take() == (0, 3, 0) and second.prepared
    second.attach(4242, everywhere=True)
    assert second.remove_lock_free() is False  # busy: a drain waits, so not here
    assert fs.killed == [] and any(p.exists() for p in second.paths.values())
    second.remove(timeout_s=5)
    assert not any(p.exists() for p in second.paths.values())
