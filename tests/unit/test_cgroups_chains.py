"""The parent chain a process makes for its VMs: kept while it lives, gone when it exits.

Real processes (a subprocess exiting normally, one SIGKILLed, a forked child) on the fake
kernel; the ledger format as older releases read it. The interleavings with other processes
are in test_cgroups_lockfree, the work counts in test_cgroups_workcount.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fake_cgroupfs import FakeKernel

from ironclaw_orchestrator.vm.cgroups import (
    CgroupLayout,
    VmCgroups,
    cgroup_settings,
    chains,
    ledger,
    release_chains,
)
from ironclaw_orchestrator.vm.cgroups.tree import sweep_intermediates
from ironclaw_orchestrator.vm.config import JailerConfig

V1 = ("cpu", "cpuacct", "memory")

#: Builds the v1 host of test_cgroups_workcount under argv[1] (if new), then runs VM
#: lifecycles; argv[2]: "exit" (a normal exit), "kill" (SIGKILL itself with the chain kept),
#: "busy" (exit while a VM still runs).
_CHILD = r"""
import os, signal, sys
from pathlib import Path
from fake_cgroupfs import FakeKernel
from ironclaw_orchestrator.vm.cgroups import CgroupLayout, VmCgroups, cgroup_settings
from ironclaw_orchestrator.vm.config import JailerConfig

root, how = Path(sys.argv[1]), sys.argv[2]
fs = FakeKernel(root / "cg")
layout = CgroupLayout(
    mode="v1",
    v1_mounts={c: root / "cg" / c for c in ("cpu", "cpuacct", "memory")},
    unified_mount=None,
    unified_controllers=frozenset(),
    own_paths={"cpu": "/", "cpuacct": "/", "memory": "/process_api/abc"},
)
settings = cgroup_settings(JailerConfig(memory_limit_mb=128), 1, None)
lock = root / "run" / "cgroup.lock"
def vm(name):
    return VmCgroups.plan(layout, 1, name, settings, None, lock_path=lock, fs=fs)
for n in range(3):
    a = vm(f"vm{n}")
    a.prepare()
    a.remove()
assert (root / "cg/cpu/process_api/abc/ironclaw").is_dir()  # kept while we run
if how == "busy":
    vm("vmbusy").prepare()
if how == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
sys.exit(0)
"""


def make_host(root: Path) -> tuple[CgroupLayout, FakeKernel, Path]:
    for c in V1:
        (root / "cg" / c).mkdir(parents=True)
        (root / "cg" / c / "cgroup.procs").write_text("1\n")
    fs = FakeKernel(root / "cg")
    fs.mkdir(root / "cg" / "memory" / "process_api")
    fs.mkdir(root / "cg" / "memory" / "process_api" / "abc")
    layout = CgroupLayout(
        mode="v1",
        v1_mounts={c: root / "cg" / c for c in V1},
        unified_mount=None,
        unified_controllers=frozenset(),
        own_paths={"cpu": "/", "cpuacct": "/", "memory": "/process_api/abc"},
    )
    return layout, fs, root / "run" / "cgroup.lock"


def dirs(root: Path) -> set[Path]:
    return {p for p in (root / "cg").rglob("*") if p.is_dir()}


def run_child(root: Path, how: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    return subprocess.run(
        [sys.executable, "-c", _CHILD, str(root), how],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_process_that_exits_leaves_nothing(tmp_path: Path) -> None:
    make_host(tmp_path)
    before = dirs(tmp_path)
    done = run_child(tmp_path, "exit")
    assert done.returncode == 0, done.stderr
    assert dirs(tmp_path) == before
    assert ledger.listing(tmp_path / "run" / "cgroup.lock") == {}


def test_a_vm_still_running_at_exit_keeps_its_chain_listed(tmp_path: Path) -> None:
    """The exit hook removes only what is empty: a VM left running (a leak of the caller's)
    keeps the chain, which stays listed for gc."""
    _, fs, lock = make_host(tmp_path)
    before = dirs(tmp_path)
    done = run_child(tmp_path, "busy")
    assert done.returncode == 0, done.stderr
    busy = {p for p in dirs(tmp_path) if p.name == "vmbusy"}
    assert len(busy) == 3
    assert set(ledger.listing(lock)) == {str(p) for p in dirs(tmp_path) - before - busy}
    for p in busy:
        fs.rmdir(p)
    assert len(sweep_intermediates(lock, fs)) == 7  # its maker is gone


def test_a_killed_process_s_chain_is_removed_by_gc(tmp_path: Path) -> None:
    _, fs, lock = make_host(tmp_path)
    before = dirs(tmp_path)
    done = run_child(tmp_path, "kill")
    assert done.returncode == -signal.SIGKILL, done.stderr
    left = dirs(tmp_path) - before
    assert len(left) == 7  # the chain: no VM directory
    owners = set(ledger.listing(lock).values())
    assert len(owners) == 1 and not ledger.owner_alive(owners.pop())
    assert set(sweep_intermediates(lock, fs)) == left
    assert dirs(tmp_path) == before
    assert ledger.listing(lock) == {}


def test_a_forked_child_leaves_its_parent_s_chain_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout, fs, lock = make_host(tmp_path)
    monkeypatch.setattr(chains, "_state", chains._State())
    before = dirs(tmp_path)
    settings = cgroup_settings(JailerConfig(memory_limit_mb=128), 1, None)
    a = VmCgroups.plan(layout, 1, "vm1", settings, None, lock_path=lock, fs=fs)
    a.prepare()
    a.remove()
    kept = dirs(tmp_path)
    assert chains._state.hooked and kept > before
    pid = os.fork()
    if pid == 0:  # the child: its exit hook (and an explicit release) must remove nothing
        code = 1
        try:
            chains._at_exit()
            chains.release()
            code = 0 if chains._state.kept == {} else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert dirs(tmp_path) == kept
    assert len(ledger.listing(lock)) == 7
    assert set(ledger.listing(lock).values()) == {ledger.this_process()}
    release_chains([lock])
    assert dirs(tmp_path) == before


def test_the_ledger_stays_readable_for_older_releases(tmp_path: Path) -> None:
    """Older releases keep every line starting with '/' as a path and write back paths only:
    our paths survive (ownerless, then swept once empty as before); their lines read as
    ownerless here."""
    lock = tmp_path / "cgroup.lock"
    ledger.record(lock, ["/sys/fs/cgroup/cpu/a", "/sys/fs/cgroup/cpu/a/b"])
    text = ledger.ledger_path(lock).read_text()
    old_view = [line for line in text.splitlines() if line.startswith("/")]
    assert old_view == ["/sys/fs/cgroup/cpu/a", "/sys/fs/cgroup/cpu/a/b"]
    assert set(ledger.listing(lock).values()) == {ledger.this_process()}
    ledger.ledger_path(lock).write_text("".join(f"{p}\n" for p in old_view))  # rewritten
    assert ledger.listing(lock) == dict.fromkeys(old_view)
    assert not ledger.owner_alive(None) and not ledger.owner_alive("12:x")


def test_a_maker_leaving_hands_its_busy_chain_over(tmp_path: Path) -> None:
    """At exit a maker disowns what another process's VMs still use: the next sweep removes
    it once empty, even while the leaving maker can still be seen alive (it is on its way
    out; sparing it then left the chain behind until the next gc)."""
    from ironclaw_orchestrator.vm.cgroups import ledger

    lock = tmp_path / "cg.lock"
    me = ledger.this_process()
    other = f"{os.getppid()}:1"  # some other process (its start time does not matter)
    chain, theirs = tmp_path / "mem" / "chain", tmp_path / "mem" / "theirs"
    for d in (chain, theirs):
        d.mkdir(parents=True)
        (d / "cgroup.procs").write_text("")
    ledger._write(ledger.ledger_path(lock), {str(chain): me, str(theirs): other})
    ledger.disown(lock, me)
    assert ledger.listing(lock) == {str(chain): None, str(theirs): other}
    fs = FakeKernel(tmp_path)
    assert ledger.sweep(lock, fs, spare=lambda owner: owner is not None) == [chain]
    assert not chain.exists() and theirs.exists()
