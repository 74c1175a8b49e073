"""VmCgroups on the host's real cgroup v1 hierarchy (root only; no jailer/firecracker needed).

The jailer's part (attaching the VMM to the controllers it manages) is played by
``attach(pid, everywhere=True)``.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from leftovers import leftovers

from ironclaw_orchestrator.errors import CgroupControllerUnavailableError, CgroupError
from ironclaw_orchestrator.vm.cgroups import (
    VmCgroups,
    cgroup_settings,
    choose_version,
    controller_names,
    detect_layout,
    disk_device_for,
    release_chains,
)
from ironclaw_orchestrator.vm.config import JailerConfig


def _v1_ready() -> bool:
    if os.geteuid() != 0:
        return False
    mounts = detect_layout().v1_mounts
    return "memory" in mounts and "cpu" in mounts


pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not _v1_ready(), reason="needs root and v1 memory+cpu controllers"),
]


def chain_state(vm: VmCgroups) -> dict[Path, bool]:
    """Whether each directory from every mount down to the VM dir exists."""
    state: dict[Path, bool] = {}
    for mount in vm.mounts.values():
        cur = mount
        for part in [*vm.parent.split("/"), vm.vm_id]:
            cur = cur / part
            state[cur] = cur.is_dir()
    return state


def test_real_v1_prepare_attach_stats_remove(tmp_path: Path) -> None:
    layout = detect_layout()
    vm_id = f"ironclaw-test-{secrets.token_hex(4)}"
    try:
        io_device: str | None = disk_device_for(tmp_path)
    except CgroupError:
        io_device = None  # tmp on tmpfs/overlay: no io limit to test here
    cfg = JailerConfig(
        memory_limit_mb=256,
        cpu_count=1,
        pids_max=64,
        cpuset_cpus="0",
        io_write_bps=None if io_device is None else 10 * 2**20,
    )
    wanted = {s.controller for s in cgroup_settings(cfg, 1, io_device)}
    version = choose_version(layout, 1, wanted)
    assert version == 1
    settings = cgroup_settings(cfg, version, io_device)
    vm = VmCgroups.plan(layout, version, vm_id, settings, None, lock_path=tmp_path / "cg.lock")
    proc: subprocess.Popen[bytes] | None = None
    initial = chain_state(vm)
    try:
        vm.prepare()
        created = list(vm.created)
        assert created and all(not initial[d] for d in created)
        p = vm.paths
        assert (p["memory"] / "memory.limit_in_bytes").read_text().strip() == str(256 * 2**20)
        assert (p["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "100000"
        assert (p["cpu"] / "cpu.cfs_period_us").read_text().strip() == "100000"
        assert (p["pids"] / "pids.max").read_text().strip() == "64"
        assert (p["cpuset"] / "cpuset.cpus").read_text().strip() == "0"
        assert (p["cpuset"] / "cpuset.mems").read_text().strip() != ""
        assert p["cpuacct"].is_dir()
        if io_device is not None:
            text = (p["blkio"] / "blkio.throttle.write_bps_device").read_text()
            assert f"{io_device} {10 * 2**20}" in text
        for d in vm.created:
            assert d.is_dir()

        # The process execs sleep only after it has been attached, so its new memory is
        # charged to the VM's memory cgroup (v1 does not move existing charges).
        proc = subprocess.Popen(["sh", "-c", "read x; exec sleep 30"], stdin=subprocess.PIPE)
        vm.attach(proc.pid)  # what the orchestrator does: blkio + cpuacct
        vm.attach(proc.pid, everywhere=True)  # what the jailer would do for the rest
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.close()
        deadline = time.monotonic() + 5
        stats = vm.stats()
        while time.monotonic() < deadline and not (stats.memory_current_bytes or 0) > 0:
            time.sleep(0.05)
            stats = vm.stats()
        assert stats.memory_current_bytes is not None and stats.memory_current_bytes > 0
        assert stats.pids_current is not None and stats.pids_current >= 1
        assert stats.cpu_usage_ns is not None
        assert stats.nr_periods is not None
        assert vm.oom_kills() == 0
        for key in vm.paths:
            procs = (vm.paths[key] / "cgroup.procs").read_text().split()
            assert str(proc.pid) in procs, key

        record = vm.to_dict()
        vm.remove()
        assert proc.wait(timeout=5) == -9  # killed by remove()
        assert not any(d.exists() for d in vm.paths.values())
        kept = [d for d in created if d not in vm.paths.values()]
        assert kept and all(d.is_dir() for d in kept)  # the chain stays while we run ...
        release_chains([tmp_path / "cg.lock"])  # ... and goes at exit
        for d in created:
            assert not d.exists()
        assert chain_state(vm) == initial
        assert leftovers(vm_id) == []  # at any depth, in every hierarchy
        VmCgroups.from_dict(record).remove()  # idempotent, also from a registry record
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        vm.remove()
    assert leftovers(vm_id) == []


def test_real_rejected_value_leaves_nothing(tmp_path: Path) -> None:
    layout = detect_layout()
    if "cpuset" not in layout.v1_mounts:
        pytest.skip("no v1 cpuset controller")
    vm_id = f"ironclaw-test-{secrets.token_hex(4)}"
    cfg = JailerConfig(cpuset_cpus="999")
    settings = cgroup_settings(cfg, 1, None)
    vm = VmCgroups.plan(layout, 1, vm_id, settings, None, lock_path=tmp_path / "cg.lock")
    initial = chain_state(vm)
    try:
        with pytest.raises(CgroupError) as info:
            vm.prepare()
        msg = str(info.value)
        print(msg)
        assert chain_state(vm) == initial
        assert "cpuset.cpus" in msg and "'999'" in msg
        assert "cpuset_cpus" in msg  # says what to fix
        assert info.value.controller == "cpuset"
        assert info.value.value == "999"
        assert vm.created == []
        assert leftovers(vm_id) == []  # at any depth, in every hierarchy
    finally:
        vm.remove()
    assert leftovers(vm_id) == []


def test_real_v2_unavailable_on_hybrid() -> None:
    layout = detect_layout()
    needed = ["cpu", "memory"]
    if layout.mode != "hybrid" or set(controller_names(needed, 2)) <= layout.unified_controllers:
        pytest.skip("host is not hybrid with v1-bound cpu/memory")
    with pytest.raises(CgroupControllerUnavailableError) as info:
        choose_version(layout, 2, needed)
    assert "is unavailable" in str(info.value)
    assert "cgroup_version=1" in str(info.value)


_WORKER = r"""
import sys, threading
from pathlib import Path
from ironclaw_orchestrator.vm.cgroups import VmCgroups, cgroup_settings, detect_layout
from ironclaw_orchestrator.vm.cgroups.tree import sweep_intermediates
from ironclaw_orchestrator.vm.config import JailerConfig

parent, lock_path, tag = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
layout = detect_layout()
settings = cgroup_settings(JailerConfig(memory_limit_mb=128), 1, None)
errors = []

def vms(n):
    try:
        for i in range(12):
            vm = VmCgroups.plan(layout, 1, f"{tag}-{n}-{i}", settings, parent, lock_path=lock_path)
            vm.prepare()
            limit = vm.paths["memory"] / "memory.limit_in_bytes"
            assert limit.read_text().strip() == str(128 << 20), limit
            vm.remove()
    except BaseException as exc:
        errors.append(repr(exc))

def sweeps():
    for _ in range(40):
        sweep_intermediates(lock_path)

threads = [threading.Thread(target=vms, args=(n,)) for n in range(6)]
threads.append(threading.Thread(target=sweeps))
for t in threads: t.start()
for t in threads: t.join()
print("\n".join(errors))
sys.exit(1 if errors else 0)
"""


def test_real_two_orchestrators_share_a_parent_chain(tmp_path: Path) -> None:
    """Smoke test on the real kernel (the interleavings are proved in test_cgroups_lockfree):
    two processes (one lock file), 6 threads each starting and stopping VM cgroups under
    one parent chain that neither has when it starts, plus gc's sweep in each (which spares
    a live maker's chain): every VM finds its directories and values, and once both have
    exited (their exit hooks remove the chain) nothing is left and nothing is listed."""
    top = f"ironclaw-test-{secrets.token_hex(4)}"
    parent = f"{top}/a/b"
    lock_path = tmp_path / "cgroup.lock"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, parent, str(lock_path), t],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for t in ("x", "y")
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    mounts = set(detect_layout().v1_mounts.values())
    left = [m / top for m in mounts if (m / top).exists()]
    for path in left:  # clean up before asserting (deepest first)
        for sub in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if sub.is_dir():
                sub.rmdir()
        path.rmdir()
    assert [p.returncode for p in procs] == [0, 0], outs
    assert left == []
    ledger_file = tmp_path / "cgroup-intermediates"
    assert not ledger_file.exists() or ledger_file.read_text() == ""


def test_real_cgroupfs_link_count_tells_child_cgroups() -> None:
    """The lock-free remove relies on cgroupfs (kernfs) keeping nlink = 2 + subdirectories."""
    from ironclaw_orchestrator.vm.cgroups import CgroupFs

    fs = CgroupFs()
    top = detect_layout().v1_mounts["memory"] / f"ironclaw-test-{secrets.token_hex(4)}"
    top.mkdir()
    try:
        assert not fs.has_child_cgroups(top)  # only interface files
        (top / "child").mkdir()
        assert fs.has_child_cgroups(top)
        (top / "child").rmdir()
        assert not fs.has_child_cgroups(top)
    finally:
        if (top / "child").exists():
            (top / "child").rmdir()
        top.rmdir()


_VM_CHILD = r"""
import asyncio, os, signal, sys
from ironclaw_orchestrator.vm import JailerConfig, VmConfig, start_firecracker
from ironclaw_orchestrator.vm.cgroups import ledger
from ironclaw_orchestrator.vm.probe import PROBE_BOOT_ARGS, ProbeBehaviour, probe_kernel_path

vm_id, parent, how = sys.argv[1:4]
kernel = str(probe_kernel_path(ProbeBehaviour.HALT))

async def main() -> None:
    for n in ("a", "b"):  # one after the other: the second finds the chain kept
        cfg = VmConfig(
            vm_id=f"{vm_id}{n}", kernel_path=kernel, rootfs_path=None, memory_mb=128,
            boot_args=PROBE_BOOT_ARGS, jailer=JailerConfig(parent_cgroup=parent),
        )
        vm = await start_firecracker(cfg)
        await vm.stop()

asyncio.run(main())
print(ledger.this_process(), flush=True)
if how == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _chain_tops(top: str) -> list[Path]:
    return sorted({m / top for m in detect_layout().v1_mounts.values()})


def _run_vm_child(vm_id: str, how: str) -> tuple[subprocess.CompletedProcess[str], str]:
    done = subprocess.run(
        [sys.executable, "-c", _VM_CHILD, vm_id, f"{vm_id}/ironclaw", how],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done, done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def _force_remove(tops: list[Path]) -> None:
    for top in tops:
        if top.exists():
            for sub in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if sub.is_dir():
                    sub.rmdir()
            top.rmdir()


def test_real_a_process_that_exits_removes_its_parent_chain(vm_id: str) -> None:
    """A process starts and stops two VMs one after the other under a parent chain that did
    not exist, and exits: its exit hook removes the chain; nothing is left, nothing listed."""
    from ironclaw_orchestrator.vm.cgroups import DEFAULT_LOCK_PATH, ledger

    tops = _chain_tops(vm_id)
    try:
        done, owner = _run_vm_child(vm_id, "exit")
        assert done.returncode == 0, done.stderr[-3000:]
        assert owner
        assert [t for t in tops if t.exists()] == []
        assert not [p for p, o in ledger.listing(DEFAULT_LOCK_PATH).items() if o == owner]
        # (the host's ledger is shared: only what carries this test's id)
        assert [
            f for f in leftovers(vm_id, cgroup_lock_paths=[DEFAULT_LOCK_PATH]) if vm_id in f
        ] == []
    finally:
        _force_remove(tops)


def test_real_a_killed_process_s_chain_is_removed_by_gc(vm_id: str) -> None:
    """The same process SIGKILLed after its VMs stopped: the chain stays, listed with its dead
    maker; gc's ledger sweep (scoped here to this test's chain: the host is shared) removes it."""
    from ironclaw_orchestrator.vm.cgroups import DEFAULT_LOCK_PATH, ledger
    from ironclaw_orchestrator.vm.cgroups.tree import sweep_intermediates

    tops = _chain_tops(vm_id)
    try:
        done, owner = _run_vm_child(vm_id, "kill")
        assert done.returncode == -9, done.stderr[-3000:]
        left = [t for t in tops if t.exists()]
        assert len(left) >= 2  # the chain survived its maker (cpu, cpuacct, memory at least)
        assert not [d for t in left for d in (t / "ironclaw").glob(f"{vm_id}*")]  # no VM's
        mine = {p for p, o in ledger.listing(DEFAULT_LOCK_PATH).items() if o == owner}
        assert {str(t) for t in left} | {str(t / "ironclaw") for t in left} == mine
        assert not ledger.owner_alive(owner)
        found = leftovers(vm_id, cgroup_lock_paths=[DEFAULT_LOCK_PATH])
        assert [f for f in found if f.startswith("parent cgroup chain") and vm_id in f]
        removed = sweep_intermediates(within=[t / "ironclaw" for t in tops])
        assert {str(p) for p in removed} == mine
        assert [t for t in tops if t.exists()] == []
        assert not [p for p, o in ledger.listing(DEFAULT_LOCK_PATH).items() if o == owner]
        assert leftovers(vm_id) == []
    finally:
        _force_remove(tops)


def test_real_migration_warm_up_is_taken_and_moves_nothing() -> None:
    """The start's warm-up migration (cgroups.warmup) on the real kernel, v1: accepted, and
    every thread of this process stays in the cgroups it was in, in every hierarchy."""
    from concurrent.futures import ThreadPoolExecutor

    from ironclaw_orchestrator.vm.cgroups import CgroupFs, warmup

    with ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: None).result()  # the worker exists before the snapshot
        before = _threads_cgroups()
        assert pool.submit(warmup.migrate_in_place, detect_layout(), CgroupFs()).result()
        assert _threads_cgroups() == before


def _threads_cgroups() -> dict[str, str]:
    return {
        tid: (Path("/proc/self/task") / tid / "cgroup").read_text()
        for tid in os.listdir("/proc/self/task")
    }


_V2_CHILD = """
import json, os, sys
from pathlib import Path
from ironclaw_orchestrator.vm.cgroups import CgroupFs, CgroupLayout, detect_layout, warmup
cg = Path(sys.argv[1])
(cg / "cgroup.procs").write_text(str(os.getpid()))  # into a v2 cgroup of its own
real = detect_layout()
v2 = CgroupLayout(mode="v2", v1_mounts={}, unified_mount=real.unified_mount,
                  unified_controllers=real.unified_controllers,
                  own_paths={"": real.own_paths[""]}, mount_roots=real.mount_roots)
before = open("/proc/self/cgroup").read()
ok = warmup.migrate_in_place(v2, CgroupFs())
print(json.dumps({"ok": ok, "same": open("/proc/self/cgroup").read() == before,
                  "procs": (cg / "cgroup.procs").read_text().split()}))
"""


def test_real_v2_migration_warm_up_in_a_domain_cgroup(tmp_path: Path) -> None:
    """The v2 path on this host's real cgroup2 mount: a process in a domain cgroup of its own
    moves into it again, and stays there."""
    import json

    layout = detect_layout()
    if layout.unified_mount is None:
        pytest.skip("no cgroup2 mount on this host")
    cg = layout.unified_mount / f"ironclaw-test-warm-{secrets.token_hex(4)}"
    cg.mkdir()
    try:
        done = subprocess.run(
            [sys.executable, "-c", _V2_CHILD, str(cg)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        assert out["ok"] is True and out["same"] is True
        assert len(out["procs"]) == 1
    finally:
        cg.rmdir()  # the child has exited: the cgroup is empty
