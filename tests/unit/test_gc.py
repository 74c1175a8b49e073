"""Garbage collection on fake hosts under tmp_path: what it removes, and what it never touches."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from fake_cgroupfs import FakeKernel

from ironclaw_orchestrator.gc import JAIL_MARKER, GcHost, GcReport, collect_garbage
from ironclaw_orchestrator.registry import Registry, is_alive, read_process_start
from ironclaw_orchestrator.vm.cgroups import CgroupLayout, VmCgroups
from ironclaw_orchestrator.vm.cgroups.limits import setting


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


class FakeHost(GcHost):
    """Network namespaces are plain files (making real ones needs root); cgroups live on a
    fake cgroup kernel under tmp_path and are removed by the real code (vm/cleanup.py)."""

    def __init__(self, root: Path) -> None:
        memory = root / "cgroup" / "memory"  # one v1 hierarchy
        memory.mkdir(parents=True)
        (memory / "cgroup.procs").write_text("1\n")
        self.kernel = FakeKernel(root / "cgroup")
        super().__init__(
            netns_dir=root / "netns", cgroup_fs=self.kernel, cgroup_lock_path=root / "cg.lock"
        )
        self.netns_dir.mkdir()
        self.cgroup_lock_path.touch()  # the host's lock file exists before any gc
        self.cgroup_parent = memory / "ironclaw"
        self.kernel.mkdir(self.cgroup_parent)
        self.layout = CgroupLayout("v1", {"memory": memory}, None, frozenset(), {"memory": "/"})
        self.users: dict[str, list[int]] = {}
        self.calls: list[tuple[str, Any]] = []

    def netns_users(self, name: str) -> list[int]:
        return self.users.get(name, [])

    def remove_network(self, netns: str, vm_id: str, tap: str | None, uplink: bool) -> None:
        self.calls.append(("remove_network", (netns, vm_id, tap, uplink)))
        (self.netns_dir / netns).unlink(missing_ok=True)

    def remove_cgroups(self, data: dict[str, Any]) -> None:
        self.calls.append(("remove_cgroups", data.get("vm_id")))
        super().remove_cgroups(data)

    def cgroup_parent_dirs(self, records: Any) -> list[Path]:
        return [self.cgroup_parent]


class World:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.reg = Registry(root / "state")
        self.host = FakeHost(root)
        self.base = root / "jail"
        self.run_root = root / "run"
        (self.base / "firecracker").mkdir(parents=True)
        (self.run_root / "vms").mkdir(parents=True)

    def gc(self, **kw: Any) -> GcReport:
        kw.setdefault("orphan_grace_s", 0.0)
        return collect_garbage(
            self.reg, chroot_bases=(self.base,), run_root=self.run_root, host=self.host, **kw
        )

    def jail(self, vm_id: str, marker: bool = True) -> Path:
        path = self.base / "firecracker" / vm_id
        (path / "root" / "run").mkdir(parents=True)
        (path / "root" / "vmlinux").write_text("kernel")
        if marker:
            (path / JAIL_MARKER).write_text(vm_id)
        return path

    def run_dir(self, vm_id: str) -> Path:
        path = self.run_root / "vms" / vm_id
        path.mkdir()
        (path / "console.log").write_text("hello")
        return path

    def netns(self, name: str) -> None:
        (self.host.netns_dir / name).write_text("")

    def cgroup(self, vm_id: str, pids: str = "") -> Path:
        """A VM's memory cgroup with no record (an orphan, unless a record names it)."""
        path = self.host.cgroup_parent / vm_id
        self.host.kernel.mkdir(path)
        for pid in pids.split():
            self.host.kernel.write(path / "cgroup.procs", pid)
        return path

    def cgroup_record(self, vm_id: str) -> tuple[Path, dict[str, Any]]:
        """A VM's cgroup made as a start makes it, and its record (``to_dict``)."""
        limit = setting("memory", "memory.limit_in_bytes", 256 << 20)
        cgroups = VmCgroups.plan(
            self.host.layout, 1, vm_id, [limit], None,
            self.host.cgroup_lock_path, fs=self.host.kernel,
        )  # fmt: skip
        cgroups.prepare()
        return cgroups.paths["memory"], json.loads(json.dumps(cgroups.to_dict()))

    def full_vm(self, vm_id: str, *, owner_dead: bool = True, **fields: Any) -> dict[str, Path]:
        cg, cg_record = self.cgroup_record(vm_id)
        paths = {"jail": self.jail(vm_id), "run": self.run_dir(vm_id), "cg": cg}
        self.netns(f"ironclaw-{vm_id}")
        owner: dict[str, Any] = (
            {"owner_pid": dead_pid(), "owner_start_time": 1} if owner_dead else {}
        )
        self.reg.claim(
            vm_id,
            **owner,
            state="running",
            jail_dir=paths["jail"],
            run_dir=paths["run"],
            netns_name=f"ironclaw-{vm_id}",
            tap="icl0123456789ab",
            cgroups=cg_record,
            **fields,
        )
        return paths

    def snapshot(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*"))


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_dead_owner_record_is_collected(world: World) -> None:
    paths = world.full_vm("vm-dead")
    report = world.gc()
    assert report.ok, report.to_dict()
    assert not paths["jail"].exists() and not paths["run"].exists()
    assert not paths["cg"].exists()
    assert not (world.host.netns_dir / "ironclaw-vm-dead").exists()
    assert world.reg.get("vm-dead") is None
    net = ("remove_network", ("ironclaw-vm-dead", "vm-dead", "icl0123456789ab", False))
    assert net in world.host.calls
    kinds = {a.kind: a.action for a in report.actions if a.vm_id == "vm-dead"}
    assert kinds == {
        "cgroups": "removed",
        "netns": "removed",
        "jail_dir": "removed",
        "run_dir": "removed",
        "record": "removed",
    }
    json.dumps(report.to_dict())  # JSON-able


def test_live_owner_is_left_alone(world: World) -> None:
    world.full_vm("vm-live", owner_dead=False)
    before = world.snapshot()
    report = world.gc()
    assert report.live == ["vm-live"] and report.actions == []
    assert world.snapshot() == before


def test_dry_run_touches_nothing(world: World) -> None:
    world.full_vm("vm-dead")
    world.jail("orphan-1")
    world.run_dir("orphan-2")
    world.netns("ironclaw-orphan-3")
    world.cgroup("orphan-4")
    (world.reg.state_dir / "broken.json").write_text("{")
    before = world.snapshot()
    report = world.gc(dry_run=True)
    assert world.snapshot() == before
    assert world.host.calls == []
    assert report.dry_run and report.actions
    assert all(a.action.startswith("would ") for a in report.actions), report.to_dict()
    planned = {(a.kind, a.vm_id) for a in report.actions}
    assert {
        ("jail_dir", "orphan-1"),
        ("run_dir", "orphan-2"),
        ("netns", "orphan-3"),
        ("cgroup", "orphan-4"),
        ("record", "broken"),
        ("record", "vm-dead"),
    } <= planned


def test_orphans_of_ours_are_removed(world: World) -> None:
    jail = world.jail("orphan-1")
    run = world.run_dir("orphan-2")
    world.netns("ironclaw-orphan-3")
    cg = world.cgroup("orphan-4")
    report = world.gc()
    assert report.ok, report.to_dict()
    assert not jail.exists() and not run.exists() and not cg.exists()
    assert not world.host.cgroup_parent.exists()  # our parent, empty now: removed too
    assert not (world.host.netns_dir / "ironclaw-orphan-3").exists()


def test_never_touches_what_is_not_ours(world: World) -> None:
    unmarked = world.jail("no-marker", marker=False)
    other_exec = world.base / "other-vmm" / "thing"
    other_exec.mkdir(parents=True)
    world.netns("other-ns")
    world.netns("docker-1234")
    world.netns("ironclaw-bad_name!")  # not a VM id
    stranger = world.root / "cgroup" / "memory" / "user.slice" / "orphan"
    stranger.mkdir(parents=True)
    odd_run = world.run_root / "vms" / "not.an.id"
    odd_run.mkdir()
    (world.run_root / "other").mkdir()
    (world.reg.state_dir / "notes.txt").write_text("mine")
    before = world.snapshot()
    report = world.gc()
    assert report.ok and report.actions == [], report.to_dict()
    assert world.snapshot() == before
    assert unmarked.exists()


def test_orphans_in_use_or_young_are_skipped(world: World) -> None:
    world.netns("ironclaw-busy")
    world.host.users["ironclaw-busy"] = [4242]
    cg = world.cgroup("busy-cg", pids="4242\n")
    young = world.jail("young")
    report = world.gc(orphan_grace_s=60.0)
    assert (world.host.netns_dir / "ironclaw-busy").exists() and cg.exists() and young.exists()
    skipped = {a.name.rsplit("/", 1)[-1]: a.reason for a in report.actions}
    assert "in use by pid 4242" in skipped["ironclaw-busy"]
    assert "in use by pid 4242" in skipped["busy-cg"]
    assert "younger than 60s" in skipped["young"]
    old = time.time() - 120
    os.utime(young / JAIL_MARKER, (old, old))
    world.gc(orphan_grace_s=60.0)
    assert not young.exists()


def test_recorded_paths_are_checked_before_deleting(world: World) -> None:
    precious = world.root / "precious"
    precious.mkdir()
    world.reg.claim(
        "vm-x", owner_pid=dead_pid(), owner_start_time=1, jail_dir=precious, run_dir=Path("/")
    )
    report = world.gc()
    assert precious.exists()
    assert not report.ok
    assert {a.kind for a in report.errors} == {"jail_dir", "run_dir"}
    assert world.reg.get("vm-x") is not None  # kept: the next gc retries


def test_failed_step_keeps_the_record(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.full_vm("vm-dead")

    def fail(data: dict[str, Any]) -> None:
        raise OSError(16, "Device or resource busy")

    monkeypatch.setattr(world.host, "remove_cgroups", fail)
    report = world.gc()
    assert [a.kind for a in report.errors] == ["cgroups"]
    assert "busy" in (report.errors[0].error or "")
    assert world.reg.get("vm-dead") is not None
    # Every other step still ran.
    assert not (world.base / "firecracker" / "vm-dead").exists()


def test_corrupt_record_is_moved_aside(world: World) -> None:
    (world.reg.state_dir / "broken.json").write_text("{")
    report = world.gc()
    assert report.ok
    assert not (world.reg.state_dir / "broken.json").exists()
    assert any(p.name.startswith("broken.json.corrupt-") for p in world.reg.state_dir.iterdir())


def test_vm_ids_limits_the_collection(world: World) -> None:
    world.full_vm("vm-a")
    world.full_vm("vm-b")
    world.jail("orphan-c")
    world.gc(vm_ids=["vm-a"])
    assert world.reg.get("vm-a") is None
    assert world.reg.get("vm-b") is not None
    assert (world.base / "firecracker" / "orphan-c").exists()


def test_stale_state_files_are_removed(world: World) -> None:
    world.reg.claim("vm-live")
    tmp = world.reg.state_dir / ".vm-live.json.abc.tmp"
    tmp.write_text("{")
    log = world.reg.state_dir / "gone.log"
    log.write_text("old output")
    live_log = world.reg.log_path("vm-live")
    live_log.write_text("current output")
    world.gc()
    assert not tmp.exists() and not log.exists() and live_log.exists()


def test_vmm_of_a_dead_owner_is_killed_and_reaped(world: World) -> None:
    vmm = subprocess.Popen(["sleep", "60"])
    try:
        start = read_process_start(vmm.pid)
        world.reg.claim(
            "vm-k", owner_pid=dead_pid(), owner_start_time=1, vmm_pid=vmm.pid, vmm_start_time=start
        )
        report = world.gc()
        assert report.ok, report.to_dict()
        assert [(a.kind, a.action) for a in report.actions if a.kind == "vmm"] == [
            ("vmm", "killed")
        ]
        assert not is_alive(vmm.pid, start)
        assert not Path(f"/proc/{vmm.pid}").exists()  # reaped by gc, not left a zombie
    finally:
        vmm.kill()
        vmm.wait()


def test_recycled_vmm_pid_is_not_signalled(world: World) -> None:
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        start = read_process_start(bystander.pid)
        assert start is not None
        world.reg.claim(
            "vm-r",
            owner_pid=dead_pid(),
            owner_start_time=1,
            vmm_pid=bystander.pid,
            vmm_start_time=start - 1,  # the recorded VMM started earlier: pid reused since
        )
        report = world.gc()
        assert report.ok
        assert is_alive(bystander.pid, start)
        assert world.reg.get("vm-r") is None
    finally:
        bystander.kill()
        bystander.wait()


def test_resources_of_an_id_in_use_are_all_skipped(world: World) -> None:
    world.netns("ironclaw-busy")
    world.host.users["ironclaw-busy"] = [4242]
    run = world.run_dir("busy")
    jail = world.jail("busy")
    old = time.time() - 120
    for path in (run, jail / JAIL_MARKER):
        os.utime(path, (old, old))
    report = world.gc(orphan_grace_s=60.0)
    assert run.exists() and jail.exists()
    assert {a.kind for a in report.actions} == {"netns", "run_dir", "jail_dir"}
    assert all(a.action == "skipped" and "4242" in a.reason for a in report.actions)


def test_run_dir_with_an_open_file_is_skipped(world: World) -> None:
    run = world.run_dir("open-1")
    with open(run / "console.log", "a"):
        report = world.gc()
        assert run.exists()
        assert f"pid {os.getpid()}" in report.actions[0].reason
    world.gc()
    assert not run.exists()


# ---------------------------------------------------------------- never harm a live VM


def _old(path: Path) -> None:
    then = time.time() - 3600
    os.utime(path, (then, then))


def test_unrecorded_jail_in_use_is_kept_whatever_its_age(world: World) -> None:
    """A VM started without a PID namespace or pid file, under another state dir: its VMM
    is found by its working directory / root inside the jail, and nothing of it goes."""
    jail = world.jail("live-1")
    _old(jail / JAIL_MARKER)
    world.netns("ironclaw-live-1")
    vmm = subprocess.Popen(["sleep", "60"], cwd=jail / "root" / "run")
    try:
        report = world.gc(orphan_grace_s=1.0)
        assert jail.is_dir() and (world.host.netns_dir / "ironclaw-live-1").exists()
        assert {a.kind for a in report.actions} == {"jail_dir", "netns"}
        assert all(a.action == "skipped" and str(vmm.pid) in a.reason for a in report.actions)
    finally:
        vmm.kill()
        vmm.wait()
    world.gc(orphan_grace_s=1.0)
    assert not jail.exists()


def test_id_in_a_live_cgroup_is_kept(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    jail = world.jail("live-2")
    _old(jail / JAIL_MARKER)
    monkeypatch.setattr(world.host, "cgroup_users", lambda vm_id: [4343] * (vm_id == "live-2"))
    report = world.gc()
    assert jail.is_dir() and "4343" in report.actions[0].reason


def test_unfinished_jail_claim_is_collected(world: World) -> None:
    """SIGKILL during the claim leaves a temporary directory: it never blocks the id."""
    claim = world.base / "firecracker" / ".claim-vm-c-0a1b2c3d"
    claim.mkdir()
    young = world.gc(orphan_grace_s=60.0)
    assert claim.is_dir() and young.actions[0].action == "skipped"
    _old(claim)
    world.gc(orphan_grace_s=60.0)
    assert not claim.exists()


def test_vmm_in_the_recorded_jail_is_killed_only_there(world: World) -> None:
    """The owner died before recording the VMM's pid: the VMM is found in the recorded
    jail. A same-id jail elsewhere (another orchestrator's VM) is not touched."""
    mine = world.jail("vm-j")
    lost = subprocess.Popen(["sleep", "60"], cwd=mine / "root")
    other = world.base / "firecracker-v9" / "vm-j"
    (other / "root").mkdir(parents=True)
    (other / JAIL_MARKER).write_text("vm-j")
    theirs = subprocess.Popen(["sleep", "60"], cwd=other / "root")
    try:
        world.reg.claim("vm-j", owner_pid=dead_pid(), owner_start_time=1, jail_dir=mine)
        report = world.gc()
        assert report.ok, report.to_dict()
        assert ("vmm", "killed") in {(a.kind, a.action) for a in report.actions}
        assert lost.poll() is not None or not Path(f"/proc/{lost.pid}").exists()
        assert theirs.poll() is None and other.is_dir()
        assert not mine.exists()
    finally:
        for p in (lost, theirs):
            p.kill()
            with contextlib.suppress(ChildProcessError):
                p.wait()


def test_netns_of_an_id_being_started_is_as_young_as_its_dirs(world: World) -> None:
    """A VM started without a registry makes its run dir and jail, then its namespace: a gc
    in between must not take the namespace (it has no age of its own)."""
    world.netns("ironclaw-starting")
    run = world.run_dir("starting")
    report = world.gc(orphan_grace_s=60.0)
    assert (world.host.netns_dir / "ironclaw-starting").exists() and run.exists()
    assert all("younger than 60s" in a.reason for a in report.actions)
    _old(run)
    world.gc(orphan_grace_s=60.0)
    assert not (world.host.netns_dir / "ironclaw-starting").exists() and not run.exists()


@pytest.mark.parametrize(
    ("cgroups", "words"),
    [
        ({"vm_id": "vm-bad", "parent": "ironclaw", "mounts": {}}, "unknown cgroup record format"),
        ("foreign", "not on the path to its cgroups"),
    ],
)
def test_cgroup_record_the_real_code_rejects_is_an_error(
    world: World, cgroups: Any, words: str
) -> None:
    """The same validation as a VM's own stop: a record naming /etc removes nothing."""
    if cgroups == "foreign":
        cg, cgroups = world.cgroup_record("vm-bad")
        cgroups["created"] = [str(world.root / "precious"), str(cg)]
        (world.root / "precious").mkdir()
    world.reg.claim("vm-bad", owner_pid=dead_pid(), owner_start_time=1, cgroups=cgroups)
    report = world.gc()
    assert [a.kind for a in report.errors] == ["cgroups"]
    assert words in (report.errors[0].error or "")
    assert world.reg.get("vm-bad") is not None  # kept for a human (or a fixed gc)
    assert cgroups != "foreign" or (world.root / "precious").is_dir()


def test_recorded_cgroup_with_processes_is_drained_then_removed(world: World) -> None:
    cg, record = world.cgroup_record("vm-busy")
    world.host.kernel.write(cg / "cgroup.procs", "4242")
    world.reg.claim("vm-busy", owner_pid=dead_pid(), owner_start_time=1, cgroups=record)
    report = world.gc()
    assert report.ok, report.to_dict()
    assert set(world.host.kernel.killed) == {4242}  # by the fake kernel: nothing real signalled
    assert not cg.exists() and not world.host.cgroup_parent.exists()
