"""VmCgroups plan/prepare/attach/remove against a fake cgroup "kernel" on tmp_path."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from fake_cgroupfs import FakeKernel

from ironclaw_orchestrator.errors import (
    CgroupControllerUnavailableError,
    CgroupError,
    CleanupError,
)
from ironclaw_orchestrator.vm.cgroups import (
    CgroupLayout,
    VmCgroups,
    cgroup_settings,
    chains,
    ledger,
    release_chains,
)
from ironclaw_orchestrator.vm.config import JailerConfig

V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "blkio", "pids")


def all_dirs(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_dir()}


# ---------------------------------------------------------------- v1 / hybrid


@pytest.fixture
def v1(tmp_path: Path) -> tuple[CgroupLayout, FakeKernel, Path]:
    root = tmp_path / "cg"
    for c in V1_CONTROLLERS:
        (root / c).mkdir(parents=True)
        (root / c / "cgroup.procs").write_text("1\n")
    (root / "cpuset" / "cpuset.cpus").write_text("0-3\n")
    (root / "cpuset" / "cpuset.mems").write_text("0\n")
    fs = FakeKernel(root)
    fs.mkdir(root / "memory" / "process_api")  # the orchestrator's own memory cgroup
    fs.mkdir(root / "memory" / "process_api" / "abc")
    (root / "unified").mkdir()
    (root / "unified" / "cgroup.procs").write_text("")
    layout = CgroupLayout(
        mode="hybrid",
        v1_mounts={c: root / c for c in V1_CONTROLLERS},
        unified_mount=root / "unified",
        unified_controllers=frozenset(),
        own_paths={**{c: "/" for c in V1_CONTROLLERS}, "memory": "/process_api/abc", "": "/"},
    )
    return layout, fs, tmp_path / "lock"


FULL = JailerConfig(memory_limit_mb=256, cpu_count=1, pids_max=64, cpuset_cpus="1", io_read_bps=7)


def plan_v1(
    v1: tuple[CgroupLayout, FakeKernel, Path],
    cfg: JailerConfig = FULL,
    vm_id: str = "vm1",
    parent: str | None = None,
) -> VmCgroups:
    layout, fs, lock = v1
    settings = cgroup_settings(cfg, 1, "8:0")
    return VmCgroups.plan(layout, 1, vm_id, settings, parent, lock_path=lock, fs=fs)


def test_plan_hybrid_derives_parent_below_deepest(
    v1: tuple[CgroupLayout, FakeKernel, Path],
) -> None:
    vm = plan_v1(v1)
    root = v1[1].root
    assert vm.parent == "process_api/abc/ironclaw"
    assert vm.controllers == ("blkio", "cpu", "cpuacct", "cpuset", "memory", "pids")
    assert vm.paths["memory"] == root / "memory/process_api/abc/ironclaw/vm1"
    assert vm.paths["cpuacct"] == root / "cpuacct/process_api/abc/ironclaw/vm1"
    assert vm.attach_keys == ("blkio", "cpuacct")
    assert vm.jailer_args()[:4] == [
        "--cgroup-version",
        "1",
        "--parent-cgroup",
        "process_api/abc/ironclaw",
    ]
    assert not (root / "cpu" / "process_api").exists()  # plan touches nothing


def test_plan_divergent_own_paths(v1: tuple[CgroupLayout, FakeKernel, Path]) -> None:
    layout, fs, lock = v1
    own = {**layout.own_paths, "cpu": "/other/x"}
    diverging = CgroupLayout(layout.mode, layout.v1_mounts, None, frozenset(), own)
    settings = cgroup_settings(FULL, 1, "8:0")
    with pytest.raises(CgroupError, match="parent_cgroup") as info:
        VmCgroups.plan(diverging, 1, "vm1", settings, None, lock_path=lock, fs=fs)
    assert "do not nest" in str(info.value)
    vm = VmCgroups.plan(diverging, 1, "vm1", settings, "/fc/vms/", lock_path=lock, fs=fs)
    assert vm.parent == "fc/vms"
    assert vm.paths["cpu"] == fs.root / "cpu/fc/vms/vm1"


def test_plan_missing_v1_controller(v1: tuple[CgroupLayout, FakeKernel, Path]) -> None:
    layout, fs, lock = v1
    mounts = {k: v for k, v in layout.v1_mounts.items() if k != "pids"}
    partial = CgroupLayout("v1", mounts, None, frozenset(), layout.own_paths)
    with pytest.raises(CgroupControllerUnavailableError, match="Controller pids"):
        VmCgroups.plan(partial, 1, "vm1", cgroup_settings(FULL, 1, "8:0"), None, lock, fs=fs)


def test_prepare_v1_creates_and_writes(v1: tuple[CgroupLayout, FakeKernel, Path]) -> None:
    vm = plan_v1(v1)
    fs = v1[1]
    vm.prepare()
    p = vm.paths
    assert (p["memory"] / "memory.limit_in_bytes").read_text() == f"{256 * 2**20}\n"
    assert (p["cpu"] / "cpu.cfs_period_us").read_text() == "100000\n"
    assert (p["cpu"] / "cpu.cfs_quota_us").read_text() == "100000\n"
    assert (p["pids"] / "pids.max").read_text() == "64\n"
    assert (p["cpuset"] / "cpuset.cpus").read_text() == "1\n"
    assert (p["blkio"] / "blkio.throttle.read_bps_device").read_text() == "8:0 7\n"
    # new cpuset dirs inherit cpus+mems from their parent, top-down
    assert (fs.root / "cpuset/process_api/cpuset.cpus").read_text() == "0-3\n"
    assert (fs.root / "cpuset/process_api/abc/ironclaw/cpuset.mems").read_text() == "0\n"
    # cpuset.mems resolved from the parent and passed on to the jailer
    assert any(s.file == "cpuset.mems" and s.value == "0" for s in vm.settings)
    assert "cpuset.mems=0" in vm.jailer_args()
    # exactly the missing dirs were recorded; the pre-existing own memory cgroup was not
    assert fs.root / "memory/process_api/abc" not in vm.created
    assert fs.root / "memory/process_api/abc/ironclaw" in vm.created
    assert fs.root / "cpu/process_api" in vm.created
    assert len(vm.created) == 2 + 5 * 4
    assert vm.prepared


def test_prepare_rejected_value_rolls_back(v1: tuple[CgroupLayout, FakeKernel, Path]) -> None:
    _, fs, _ = v1
    before = all_dirs(fs.root)
    fs.fail[("cpuset.cpus", "1")] = errno.EINVAL
    vm = plan_v1(v1)
    with pytest.raises(CgroupError) as info:
        vm.prepare()
    msg = str(info.value)
    assert "cpuset.cpus='1'" in msg and "EINVAL" in msg and "cpuset_cpus" in msg
    assert info.value.controller == "cpuset"
    assert info.value.value == "1"
    assert info.value.path is not None and info.value.path.endswith("vm1/cpuset.cpus")
    assert all_dirs(fs.root) == before  # created dirs gone, pre-existing ones kept
    assert vm.created == []


def test_prepare_memory_rejected_rolls_back(v1: tuple[CgroupLayout, FakeKernel, Path]) -> None:
    _, fs, _ = v1
    before = all_dirs(fs.root)
    fs.fail[("memory.limit_in_bytes", None)] = errno.EBUSY
    with pytest.raises(CgroupError, match="memory_limit_mb"):
        plan_v1(v1).prepare()
    assert all_dirs(fs.root) == before


def test_prepare_existing_vm_dir_is_error(v1: tuple[CgroupLayout, FakeKernel, Path]) -> None:
    _, fs, _ = v1
    stale = fs.root / "memory/process_api/abc/ironclaw/vm1"
    stale.mkdir(parents=True)
    with pytest.raises(CgroupError, match="already exists"):
        plan_v1(v1).prepare()
    assert stale.is_dir()  # not ours: left alone
    assert not (fs.root / "cpu/process_api").exists()
    (stale / "cgroup.procs").write_text("777\n")
    vm = plan_v1(v1)
    vm.remove(timeout_s=0.1)  # e.g. a caller's finally: must not touch the other VM
    assert stale.is_dir()
    assert fs.killed == []


def test_attach_only_non_jailer_controllers(v1: tuple[CgroupLayout, FakeKernel, Path]) -> None:
    vm = plan_v1(v1)
    vm.prepare()
    vm.attach(4242)
    for key, path in vm.paths.items():
        procs = (path / "cgroup.procs").read_text().split()
        assert procs == (["4242"] if key in ("blkio", "cpuacct") else [])
    vm.attach(4343, everywhere=True)
    assert (vm.paths["memory"] / "cgroup.procs").read_text().split() == ["4343"]


def test_remove_kills_and_removes_created_only(v1: tuple[CgroupLayout, FakeKernel, Path]) -> None:
    _, fs, lock = v1
    before = all_dirs(fs.root)
    vm = plan_v1(v1)
    vm.prepare()
    vm.attach(5555, everywhere=True)
    vm.remove(timeout_s=1)
    assert 5555 in fs.killed
    assert not any(p.exists() for p in vm.paths.values())
    assert all_dirs(fs.root) > before  # the parent chain stays while this process runs
    release_chains([lock])  # as at its exit
    assert all_dirs(fs.root) == before
    assert (fs.root / "memory/process_api/abc").is_dir()
    vm.remove(timeout_s=1)  # idempotent


def test_remove_leaves_parent_used_by_other_vm(v1: tuple[CgroupLayout, FakeKernel, Path]) -> None:
    _, fs, _ = v1
    a = plan_v1(v1, vm_id="vmA")
    a.prepare()
    b = plan_v1(v1, vm_id="vmB")
    b.prepare()
    a.remove(timeout_s=1)
    assert not a.paths["memory"].exists()
    assert b.paths["memory"].is_dir() and b.paths["cpu"].is_dir()
    b.remove(timeout_s=1)
    release_chains([v1[2]])
    assert not (fs.root / "memory/process_api/abc/ironclaw").exists()
    assert (fs.root / "memory/process_api/abc").is_dir()


def test_remove_reports_every_failure(v1: tuple[CgroupLayout, FakeKernel, Path]) -> None:
    vm = plan_v1(v1)
    vm.prepare()
    stuck = vm.paths["pids"] / "cgroup.procs"
    stuck.write_text(f"{os.getpid()}\n")  # never killed: it is us
    with pytest.raises(CleanupError) as info:
        vm.remove(timeout_s=0.1)
    text = str(info.value)
    assert "orchestrator itself" in text
    assert "still holds pids" in text
    assert not vm.paths["memory"].exists()  # other steps still ran
    stuck.write_text("")
    vm.remove(timeout_s=0.1)
    assert not vm.paths["pids"].exists()


def test_roundtrip_registry_record(v1: tuple[CgroupLayout, FakeKernel, Path]) -> None:
    _, fs, _ = v1
    before = all_dirs(fs.root)
    vm = plan_v1(v1)
    vm.prepare()
    record = json.loads(json.dumps(vm.to_dict()))
    again = VmCgroups.from_dict(record, fs=fs)
    assert again.paths == vm.paths
    assert again.created == vm.created
    assert again.settings == vm.settings
    again.remove(timeout_s=1)
    release_chains([v1[2]])
    assert all_dirs(fs.root) == before


def test_from_dict_rejects_foreign_paths(v1: tuple[CgroupLayout, FakeKernel, Path]) -> None:
    vm = plan_v1(v1)
    record = vm.to_dict()
    record["created"] = ["/etc"]
    with pytest.raises(CgroupError, match="corrupt"):
        VmCgroups.from_dict(record)


def test_stats_and_oom(v1: tuple[CgroupLayout, FakeKernel, Path]) -> None:
    vm = plan_v1(v1)
    vm.prepare()
    (vm.paths["memory"] / "memory.usage_in_bytes").write_text("77\n")
    (vm.paths["memory"] / "memory.oom_control").write_text("under_oom 0\noom_kill 3\n")
    (vm.paths["cpuacct"] / "cpuacct.usage").write_text("12\n")
    (vm.paths["memory"] / "memory.max_usage_in_bytes").write_text("99\n")
    st = vm.stats()
    assert st.memory_current_bytes == 77
    assert st.cpu_usage_ns == 12
    assert st.memory_peak_bytes == 99
    assert vm.oom_kills() == 3


# ---------------------------------------------------------------- v2


def make_v2(tmp_path: Path, own: str = "/", procs: dict[str, str] | None = None) -> CgroupLayout:
    unified = tmp_path / "cg" / "unified"
    unified.mkdir(parents=True)
    (unified / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (unified / "cgroup.subtree_control").write_text("")
    (unified / "cpuset.mems.effective").write_text("0\n")
    (unified / "cgroup.procs").write_text("")
    fs = FakeKernel(tmp_path / "cg")
    for rel, pids in (procs or {}).items():
        d = unified / rel
        if rel:
            fs.mkdir(d)
        (d / "cgroup.procs").write_text(pids)  # the kernel's side: who runs there
    return CgroupLayout(
        "v2", {}, unified, frozenset({"cpuset", "cpu", "io", "memory", "pids"}), {"": own}
    )


def test_v2_prepare_enables_subtree_control(tmp_path: Path) -> None:
    layout = make_v2(tmp_path, own="/svc", procs={"svc": ""})
    fs = FakeKernel(tmp_path / "cg")
    cfg = JailerConfig(pids_max=10, io_write_bps=5, cpuset_cpus="0")
    vm = VmCgroups.plan(
        layout, 2, "vm1", cgroup_settings(cfg, 2, "8:0"), None, tmp_path / "l", fs=fs
    )
    assert vm.parent == "svc/ironclaw"
    assert vm.attach_keys == ()
    with pytest.raises(CgroupError, match="above the orchestrator's own cgroup"):
        vm.prepare()  # root's subtree_control lacks the controllers: not ours to change
    assert not (layout.unified_mount / "svc/ironclaw").exists()  # type: ignore[operator]
    root_ctl = layout.unified_mount / "cgroup.subtree_control"  # type: ignore[operator]
    fs.write(root_ctl, "+cpu +cpuset +io +memory +pids")  # as the admin would
    vm.prepare()
    u = layout.unified_mount
    assert u is not None
    want = {"cpu", "cpuset", "io", "memory", "pids"}
    assert set((u / "svc/cgroup.subtree_control").read_text().split()) == want
    assert set((u / "svc/ironclaw/cgroup.subtree_control").read_text().split()) == want
    assert (u / "svc/ironclaw/vm1/cgroup.subtree_control").read_text() == ""
    d = vm.paths["unified"]
    assert (d / "cpu.max").read_text() == "100000 100000\n"
    assert (d / "memory.max").read_text() == f"{256 * 2**20}\n"
    assert (d / "io.max").read_text() == "8:0 wbps=5\n"
    assert (d / "cpuset.mems").read_text() == "0\n"  # from parent's cpuset.mems.effective
    assert "--cgroup" in vm.jailer_args() and "io.max" not in " ".join(vm.jailer_args())
    vm.remove(timeout_s=1)
    assert (u / "svc/ironclaw").is_dir()  # kept for the next VM while this process runs
    release_chains([tmp_path / "l"])
    assert not (u / "svc/ironclaw").exists()
    assert (u / "svc").is_dir()


def test_v2_ebusy_names_cgroup_and_pids(tmp_path: Path) -> None:
    layout = make_v2(tmp_path, own="/svc", procs={"svc": "321\n654\n"})
    fs = FakeKernel(tmp_path / "cg")
    u = layout.unified_mount
    assert u is not None
    fs.write(u / "cgroup.subtree_control", "+cpu +memory")
    # No injected failure: the fake kernel's no-internal-processes rule refuses +cpu in svc.
    vm = VmCgroups.plan(
        layout, 2, "vm1", cgroup_settings(JailerConfig(), 2, None), None, tmp_path / "l", fs=fs
    )
    before = all_dirs(tmp_path / "cg")
    with pytest.raises(CgroupError) as info:
        vm.prepare()
    msg = str(info.value)
    assert "EBUSY" in msg and str(u / "svc") in msg
    assert "321, 654" in msg
    assert "parent_cgroup" in msg and "Delegate=yes" in msg
    assert info.value.value == "+cpu"
    assert all_dirs(tmp_path / "cg") == before


def test_v2_explicit_parent_may_enable_anywhere(tmp_path: Path) -> None:
    layout = make_v2(tmp_path, own="/svc", procs={"svc": "1\n"})
    fs = FakeKernel(tmp_path / "cg")
    vm = VmCgroups.plan(
        layout, 2, "vm1", cgroup_settings(JailerConfig(), 2, None), "vms", tmp_path / "l", fs=fs
    )
    vm.prepare()
    u = layout.unified_mount
    assert u is not None
    assert set((u / "cgroup.subtree_control").read_text().split()) == {"cpu", "memory"}
    assert vm.created == [u / "vms", u / "vms/vm1"]
    vm.remove(timeout_s=1)
    release_chains([tmp_path / "l"])
    assert not (u / "vms").exists()


def test_v2_missing_controller(tmp_path: Path) -> None:
    layout = make_v2(tmp_path)
    hybrid = CgroupLayout("hybrid", {"memory": Path("/x")}, layout.unified_mount, frozenset(), {})
    with pytest.raises(CgroupControllerUnavailableError) as info:
        VmCgroups.plan(hybrid, 2, "vm1", cgroup_settings(JailerConfig(), 2, None), None)
    assert "Controller cpu is unavailable" in str(info.value)
    assert "cgroup_version=1" in str(info.value)


def test_v2_remove_uses_cgroup_kill(tmp_path: Path) -> None:
    layout = make_v2(tmp_path, procs={"": "1\n"})
    u = layout.unified_mount
    assert u is not None
    (u / "cgroup.subtree_control").write_text("cpu memory\n")
    fs = FakeKernel(tmp_path / "cg")
    vm = VmCgroups.plan(
        layout, 2, "vm9", cgroup_settings(JailerConfig(), 2, None), None, tmp_path / "l", fs=fs
    )
    vm.prepare()
    vm.attach(999, everywhere=True)
    vm.remove(timeout_s=1)
    assert (vm.paths["unified"] / "cgroup.kill", "1") in fs.writes
    assert fs.killed == [999]
    release_chains([tmp_path / "l"])
    assert not (u / "ironclaw").exists()


def test_intermediate_dirs_are_removed_by_the_last_vm_out(
    v1: tuple[CgroupLayout, FakeKernel, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """vm1 creates cpu/process_api (needed for the shared parent); vm2 (another orchestrator)
    reuses it; vm1 stops first, so the directory is busy then; vm1's orchestrator dies: vm2,
    which did not create it, must remove it."""
    fs = v1[1]
    first, second = plan_v1(v1, vm_id="vm1"), plan_v1(v1, vm_id="vm2")
    first.prepare()
    second.prepare()
    shared = fs.root / "cpu/process_api"
    assert shared in first.created and shared not in second.created
    first.remove()
    assert (shared / "abc/ironclaw/vm2").is_dir()
    monkeypatch.setattr(chains, "_state", chains._State())  # vm2's process keeps nothing
    monkeypatch.setattr(ledger, "owner_alive", lambda owner: False)  # vm1's has exited
    second.remove()
    assert not shared.exists()
    assert not (fs.root / "memory/process_api/abc/ironclaw").exists()
    assert (fs.root / "memory/process_api/abc").is_dir()  # pre-existing: never touched


def test_sweep_intermediates_for_gc_skips_busy_and_foreign(
    v1: tuple[CgroupLayout, FakeKernel, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ironclaw_orchestrator.vm.cgroups.ledger import ledger_path, record_intermediate
    from ironclaw_orchestrator.vm.cgroups.tree import sweep_intermediates

    fs, lock = v1[1], v1[2]
    vm = plan_v1(v1, vm_id="vm1")
    vm.prepare()
    vm.created.clear()  # as if the VM's own record were lost: only the ledger remembers
    for d in sorted(vm.paths.values()):
        if d.exists():
            fs.rmdir(d)
    outside = lock.parent / "not-a-cgroup"
    outside.mkdir()
    record_intermediate(lock, outside)
    assert sweep_intermediates(lock, fs) == []  # their maker (this process) still runs
    monkeypatch.setattr(ledger, "owner_alive", lambda owner: False)  # a crashed maker
    removed = sweep_intermediates(lock, fs)
    assert fs.root / "cpu/process_api" in removed
    assert outside.is_dir()  # not on a cgroup file system: forgotten, never removed
    assert not ledger_path(lock).read_text().strip()
