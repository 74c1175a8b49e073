"""The cgroup host lock is taken only where the parent chain can change; proofs by interleaving.

A VM whose parent directories exist makes and removes only its own directories, without the
host lock (see :mod:`ironclaw_orchestrator.vm.cgroups.creation` and ``.removal``). The lock
serialises *intermediate* directories and the ledger; these tests run another orchestrator's
step (the last VM out removing the chain, gc's ledger sweep) at every point of a lock-free
prepare or remove, in one thread, on the strict fake kernel, and check that nothing is left
behind and that every directory we made and nobody runs in is listed in the ledger. Points
where the first party holds the lock are skipped: there the other party would just wait for
it, which is the next point.

A chain stays while the process that made it lives (:mod:`~ironclaw_orchestrator.vm.cgroups.
chains`): the tests simulate several orchestrator processes in one (:class:`Proc`: an owner
token, alive or not, and its own kept-chain state), each exiting (its exit hook) or crashing.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fake_cgroupfs import FakeKernel

from ironclaw_orchestrator.errors import CgroupError
from ironclaw_orchestrator.vm.cgroups import (
    CgroupFs,
    CgroupLayout,
    HostLock,
    VmCgroups,
    cgroup_settings,
    chains,
    ledger,
)
from ironclaw_orchestrator.vm.cgroups.tree import sweep_intermediates
from ironclaw_orchestrator.vm.config import JailerConfig

V1 = ("cpu", "cpuacct", "memory")
_FS_CALLS = ("read", "write", "mkdir", "rmdir", "exists", "is_dir", "subdirs", "has_child_cgroups")


class Proc:
    """A simulated orchestrator process: its ledger owner token and its kept chains."""

    def __init__(self, host: Host, n: int) -> None:
        self.host, self.owner, self.state = host, f"{900000 + n}:1", chains._State()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Run the body as this process (nesting switches back afterwards)."""
        host, before = self.host, self.host.current
        saved, chains._state = chains._state, self.state
        host.current = self
        try:
            yield
        finally:
            chains._state, host.current = saved, before

    def do(self, step: Callable[[], object]) -> Callable[[], None]:
        """``step`` as this process (to inject into another's operation)."""

        def run() -> None:
            with self.running():
                step()

        return run

    def exit(self) -> None:
        """A normal exit: the exit hook releases what this process kept."""
        with self.running():
            chains.release()
        self.host.live.discard(self.owner)

    def crash(self) -> None:
        self.host.live.discard(self.owner)


class Host:
    """A v1 host (own memory cgroup /process_api/abc, cpu and cpuacct at the root) on the fake
    kernel, counting host-lock acquisitions; ``inject(k, step)`` runs ``step`` once, right
    before the k-th cgroup-fs call made outside the lock."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        for c in V1:
            (root / c).mkdir(parents=True)
            (root / c / "cgroup.procs").write_text("1\n")
        self.fs = FakeKernel(root)
        self.fs.mkdir(root / "memory" / "process_api")
        self.fs.mkdir(root / "memory" / "process_api" / "abc")
        self.layout = CgroupLayout(
            mode="v1",
            v1_mounts={c: root / c for c in V1},
            unified_mount=None,
            unified_controllers=frozenset(),
            own_paths={"cpu": "/", "cpuacct": "/", "memory": "/process_api/abc"},
        )
        self.lock_path = root.parent / f"{root.name}.lock"
        self.initial = self.dirs()
        self.live: set[str] = set()
        self.procs: list[Proc] = []
        self.me = self.proc()  # the test's own process: everything runs as it by default
        self.current = self.me
        monkeypatch.setattr(chains, "_state", self.me.state)
        monkeypatch.setattr(ledger, "owner_alive", lambda owner: owner in self.live)
        monkeypatch.setattr(ledger, "this_process", lambda: self.current.owner)
        self.locks = 0
        self.held = 0
        self.calls = 0
        self._at: int | None = None
        self._step: Callable[[], None] | None = None
        real_enter, real_exit = HostLock.__enter__, HostLock.__exit__

        def enter(lock: HostLock) -> HostLock:
            out = real_enter(lock)
            self.locks += 1
            self.held += 1
            return out

        def exit_(lock: HostLock, *exc: object) -> None:
            self.held -= 1
            real_exit(lock, *exc)  # type: ignore[arg-type]

        monkeypatch.setattr(HostLock, "__enter__", enter)
        monkeypatch.setattr(HostLock, "__exit__", exit_)
        for name in _FS_CALLS:
            setattr(self.fs, name, self._hooked(getattr(self.fs, name)))

    def _hooked(self, real: Callable[..., object]) -> Callable[..., object]:
        def call(*args: object) -> object:
            if self._step is not None and self.held == 0:
                if self.calls == self._at:
                    step, self._step = self._step, None
                    step()
                self.calls += 1
            return real(*args)

        return call

    def proc(self) -> Proc:
        made = Proc(self, len(self.procs))
        self.procs.append(made)
        self.live.add(made.owner)
        return made

    def inject(self, at: int, step: Callable[[], None]) -> None:
        self.calls, self._at, self._step = 0, at, step

    def fired(self) -> bool:
        """Whether the injected step ran (else it runs now: "after the last point")."""
        step, self._step = self._step, None
        if step is None:
            return True
        step()
        return False

    def vm(self, vm_id: str) -> VmCgroups:
        settings = cgroup_settings(JailerConfig(memory_limit_mb=128), 1, None)
        return VmCgroups.plan(
            self.layout, 1, vm_id, settings, None, lock_path=self.lock_path, fs=self.fs
        )

    def dirs(self) -> set[Path]:
        return {p for p in self.fs.root.rglob("*") if p.is_dir()}

    def listed(self) -> set[Path]:
        path = ledger.ledger_path(self.lock_path)
        if not path.exists():
            return set()
        return {Path(line) for line in path.read_text().splitlines() if line.startswith("/")}

    def assert_accounted(self, *running: VmCgroups) -> None:
        # (no VM running: the kept chains are all that may remain, each listed)
        """Every directory we made is a running VM's own or listed in the ledger."""
        own = {p for vm in running for p in vm.paths.values()}
        assert self.dirs() - self.initial - own <= self.listed()
        for vm in running:
            assert all(p.is_dir() for p in vm.paths.values())
            limit = vm.paths["memory"] / "memory.limit_in_bytes"
            assert limit.read_text().strip() == str(128 << 20)

    def assert_clean(self) -> None:
        assert self.dirs() == self.initial
        assert self.listed() == set()


@pytest.fixture
def hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], Host]]:
    made: list[Host] = []

    def new() -> Host:
        made.append(Host(tmp_path / f"cg{len(made)}", monkeypatch))
        return made[-1]

    yield new


def _points(run: Callable[[Host, int], bool], hosts: Callable[[], Host]) -> int:
    """Run ``run(host, k)`` on a fresh host for k = 0, 1, ... until the step no longer fires
    inside (it then ran after the end); return how many points were tried."""
    k = 0
    while run(hosts(), k):
        k += 1
        assert k < 200
    return k


def test_sequential_vms_after_the_first_take_no_lock(hosts: Callable[[], Host]) -> None:
    host = hosts()
    first = host.vm("vm1")
    first.prepare()  # makes the chain: recorded and made under the lock
    first.remove()  # the chain stays: this process made it and runs on
    assert host.locks == 1
    for n in range(2, 6):
        other = host.vm(f"vm{n}")
        other.prepare()
        other.remove()
    assert host.locks == 1  # four lifecycles after the first: not one lock, not one ledger read
    host.assert_accounted()
    assert host.dirs() != host.initial
    host.me.exit()  # the exit hook removes the chain, under the lock
    assert host.locks == 2
    host.assert_clean()
    host.me.exit()  # idempotent
    host.assert_clean()


def test_vms_beside_a_running_one_take_no_lock(hosts: Callable[[], Host]) -> None:
    host = hosts()
    first = host.vm("vm1")
    first.prepare()
    for n in range(2, 6):
        other = host.vm(f"vm{n}")
        other.prepare()
        other.remove()
    first.remove()
    assert host.locks == 1
    host.me.exit()
    host.assert_clean()


def test_remove_interleaved_with_the_other_process_s_last_vm_out(
    hosts: Callable[[], Host],
) -> None:
    """A (this process, the chain's maker) and B (another process) share the chain; B's remove
    and exit run at every point of A's remove. The chain stays while A lives, then goes."""

    def run(host: Host, k: int) -> bool:
        other = host.proc()
        a, b = host.vm("vma"), host.vm("vmb")
        a.prepare()
        other.do(b.prepare)()

        def b_out() -> None:
            other.do(b.remove)()
            other.exit()

        host.inject(k, b_out)
        a.remove()
        inside = host.fired()
        host.assert_accounted()
        assert host.dirs() != host.initial  # A's chain: A still runs
        host.me.exit()
        host.assert_clean()
        return inside

    assert _points(run, hosts) >= 3  # rmdirs of A's three directories (its chain: no look)


def test_the_makers_exit_leaves_a_busy_chain_to_the_last_vm_out(hosts: Callable[[], Host]) -> None:
    """B runs a VM in the chain A made; A exits: the chain stays (busy), listed with its dead
    maker; B's VM, the last out, removes it."""
    host = hosts()
    other = host.proc()
    a, b = host.vm("vma"), host.vm("vmb")
    a.prepare()
    a.remove()
    other.do(b.prepare)()
    host.me.exit()
    host.assert_accounted(b)
    other.do(b.remove)()
    host.assert_clean()


def test_prepare_interleaved_with_the_makers_exit(hosts: Callable[[], Host]) -> None:
    """B made the chain and is idle; its exit hook (which takes the chain away) runs at every
    point of C's lock-free prepare: C either finds the chain or makes it again, recorded
    before made (an ENOENT falls back to the locked path)."""

    def run(host: Host, k: int) -> bool:
        other = host.proc()
        b, c = host.vm("vmb"), host.vm("vmc")
        with other.running():
            b.prepare()
            b.remove()
        host.inject(k, other.exit)
        c.prepare()
        inside = host.fired()
        host.assert_accounted(c)
        c.remove()
        host.me.exit()
        host.assert_clean()
        return inside

    assert _points(run, hosts) >= 3


def test_prepare_interleaved_with_a_gc_sweep(hosts: Callable[[], Host]) -> None:
    """A crashed orchestrator left the chain empty (listed); gc sweeps it at every point of
    C's prepare. The sweep never removes a parent C's directory is in (the kernel refuses)."""

    def run(host: Host, k: int) -> bool:
        crashed = host.proc()
        x = host.vm("vmx")
        crashed.do(x.prepare)()
        for p in x.paths.values():
            host.fs.rmdir(p)  # gc removed its directories by name; the chain stays
        crashed.crash()
        c = host.vm("vmc")
        host.inject(k, host.proc().do(lambda: sweep_intermediates(host.lock_path, host.fs)))
        c.prepare()
        inside = host.fired()
        host.assert_accounted(c)
        c.remove()
        host.me.exit()
        host.assert_clean()
        return inside

    assert _points(run, hosts) >= 3


def test_gc_spares_the_idle_chain_of_a_live_maker(hosts: Callable[[], Host]) -> None:
    host = hosts()
    a = host.vm("vma")
    a.prepare()
    a.remove()
    kept = host.dirs()
    assert host.proc().do(lambda: sweep_intermediates(host.lock_path, host.fs))() is None
    assert host.dirs() == kept
    host.me.crash()  # now its maker is gone: gc takes it
    host.proc().do(lambda: sweep_intermediates(host.lock_path, host.fs))()
    host.assert_clean()


def test_a_chain_removed_from_under_its_maker_is_made_again(hosts: Callable[[], Host]) -> None:
    """Someone ignoring the owners (an older release's gc, a hand) removes this process's
    idle chain at every point of its next VM's lock-free prepare: the VM gets its
    directories (remade, recorded before made) and the exit hook still cleans up."""

    def run(host: Host, k: int) -> bool:
        a, c = host.vm("vma"), host.vm("vmc")
        a.prepare()
        a.remove()

        def rip() -> None:
            with HostLock(host.lock_path):
                ledger.sweep(host.lock_path, host.fs, spare=lambda owner: False)

        host.inject(k, rip)
        c.prepare()
        inside = host.fired()
        host.assert_accounted(c)
        c.remove()
        host.me.exit()
        host.assert_clean()
        return inside

    assert _points(run, hosts) >= 3


def test_remove_interleaved_with_a_new_vm_hands_over_the_chain(hosts: Callable[[], Host]) -> None:
    """B's VM is the last one in B's chain; B stops it and exits while this process's new VM
    is prepared at every point of that remove. The chain stays exactly as long as somebody
    uses it."""

    def run(host: Host, k: int) -> bool:
        other = host.proc()
        a, c = host.vm("vma"), host.vm("vmc")
        other.do(a.prepare)()
        host.inject(k, host.me.do(c.prepare))
        other.do(a.remove)()
        other.exit()
        inside = host.fired()
        host.assert_accounted(c)
        c.remove()
        host.me.exit()
        host.assert_clean()
        return inside

    assert _points(run, hosts) >= 3  # rmdirs of A's three directories


def test_a_rejected_value_in_place_removes_only_the_vms_directories(
    hosts: Callable[[], Host],
) -> None:
    host = hosts()
    running = host.vm("vm1")
    running.prepare()
    host.fs.fail[("memory.limit_in_bytes", None)] = errno.EINVAL
    failing = host.vm("vm2")
    with pytest.raises(CgroupError, match=r"memory\.limit_in_bytes"):
        failing.prepare()
    assert host.locks == 1  # only vm1's chain; the rollback beside vm1 needs none
    assert not any(p.exists() for p in failing.paths.values())
    host.assert_accounted(running)
    del host.fs.fail[("memory.limit_in_bytes", None)]
    running.remove()
    host.me.exit()
    host.assert_clean()


def test_an_existing_vm_directory_is_refused_and_left_alone(hosts: Callable[[], Host]) -> None:
    host = hosts()
    running = host.vm("vm1")
    running.prepare()
    theirs = host.vm("vm2").paths["memory"]
    host.fs.mkdir(theirs)  # the same id, started by someone else
    with pytest.raises(CgroupError, match="already exists"):
        host.vm("vm2").prepare()
    assert theirs.is_dir()
    assert not host.vm("vm2").paths["cpu"].exists()  # made in place, removed again
    host.fs.rmdir(theirs)
    running.remove()
    host.me.exit()
    host.assert_clean()


def _v2(tmp_path: Path) -> tuple[FakeKernel, CgroupLayout]:
    u = tmp_path / "cg" / "unified"
    u.mkdir(parents=True)
    (u / "cgroup.controllers").write_text("cpu memory\n")
    (u / "cgroup.subtree_control").write_text("cpu memory\n")
    (u / "cgroup.procs").write_text("1\n")
    fs = FakeKernel(tmp_path / "cg")
    fs.mkdir(u / "svc")
    fs.mkdir(u / "svc" / "ironclaw")  # a parent that distributes nothing yet
    return fs, CgroupLayout("v2", {}, u, frozenset({"cpu", "memory"}), {"": "/svc"})


def test_v2_in_place_only_where_the_parent_distributes_every_controller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs, layout = _v2(tmp_path)
    u = layout.unified_mount
    assert u is not None
    fs.write(u / "svc" / "cgroup.subtree_control", "+cpu")
    fs.write(u / "svc" / "cgroup.subtree_control", "+memory")
    locks: list[int] = []
    real_enter = HostLock.__enter__

    def enter(lock: HostLock) -> HostLock:
        locks.append(1)
        return real_enter(lock)

    monkeypatch.setattr(HostLock, "__enter__", enter)
    settings = cgroup_settings(JailerConfig(memory_limit_mb=256), 2, None)

    def vm(vm_id: str) -> VmCgroups:
        return VmCgroups.plan(layout, 2, vm_id, settings, None, lock_path=tmp_path / "l", fs=fs)

    first = vm("vm1")
    first.prepare()  # ironclaw/ distributes nothing: the locked path enables cpu and memory
    assert len(locks) == 1
    assert set((u / "svc/ironclaw/cgroup.subtree_control").read_text().split()) == {"cpu", "memory"}
    assert (first.paths["unified"] / "memory.max").read_text().strip() == str(256 << 20)
    second = vm("vm2")
    second.prepare()  # now it does: in place
    assert len(locks) == 1
    assert (second.paths["unified"] / "memory.max").read_text().strip() == str(256 << 20)
    second.remove()
    first.remove()
    assert not (u / "svc" / "ironclaw").exists()  # the derived parent goes once empty
    assert len(locks) == 2


def test_has_child_cgroups_counts_subdirectories(tmp_path: Path) -> None:
    if os.stat(tmp_path).st_nlink < 2:
        pytest.skip(f"{tmp_path}'s file system keeps no directory link counts")
    fs = CgroupFs()
    assert not fs.has_child_cgroups(tmp_path)
    (tmp_path / "file").write_text("")
    assert not fs.has_child_cgroups(tmp_path)
    (tmp_path / "child").mkdir()
    assert fs.has_child_cgroups(tmp_path)
    assert not fs.has_child_cgroups(tmp_path / "missing")
