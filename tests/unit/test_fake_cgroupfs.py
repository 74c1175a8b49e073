"""The fake cgroup kernel keeps the kernel's rules, and VmCgroups copes with them."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from fake_cgroupfs import FakeKernel

from ironclaw_orchestrator.errors import CleanupError
from ironclaw_orchestrator.vm.cgroups import (
    CgroupLayout,
    VmCgroups,
    cgroup_settings,
    release_chains,
)
from ironclaw_orchestrator.vm.config import JailerConfig


def v2_root(tmp_path: Path, drain_polls: int = 2) -> tuple[FakeKernel, Path]:
    u = tmp_path / "cg" / "unified"
    u.mkdir(parents=True)
    for name, text in (("cgroup.procs", "1\n"), ("cgroup.controllers", "cpu io memory pids\n")):
        (u / name).write_text(text)
    (u / "cgroup.subtree_control").write_text("")
    return FakeKernel(tmp_path / "cg", drain_polls=drain_polls), u


def test_writes_never_create_files(tmp_path: Path) -> None:
    fs, u = v2_root(tmp_path)
    fs.mkdir(u / "a")
    with pytest.raises(FileNotFoundError):
        fs.write(u / "a" / "memory.max", "100")  # memory not enabled for a's parent
    with pytest.raises(FileNotFoundError):
        fs.write(u / "a" / "no.such.file", "1")
    assert not (u / "a" / "memory.max").exists()
    fs.write(u / "cgroup.subtree_control", "+memory")
    assert (u / "a" / "memory.max").read_text() == "max\n"  # appears once enabled
    fs.write(u / "a" / "memory.max", "100")
    assert fs.read(u / "a" / "memory.max") == "100\n"
    with pytest.raises(FileNotFoundError):
        fs.mkdir(tmp_path / "cg" / "not-a-cgroup" / "x")


def test_v2_no_internal_processes(tmp_path: Path) -> None:
    fs, u = v2_root(tmp_path)
    fs.write(u / "cgroup.subtree_control", "+cpu +memory")  # the root is exempt
    fs.mkdir(u / "svc")
    fs.write(u / "svc" / "cgroup.procs", "4242")
    assert fs.read(u / "cgroup.procs").split() == ["1"]  # moved, not copied
    with pytest.raises(OSError) as info:
        fs.write(u / "svc" / "cgroup.subtree_control", "+cpu")
    assert info.value.errno == errno.EBUSY
    with pytest.raises(FileNotFoundError):
        fs.write(u / "svc" / "cgroup.subtree_control", "+pids")  # not in svc's controllers
    fs.mkdir(u / "svc" / "leaf")
    fs.write(u / "svc" / "leaf" / "cgroup.procs", "4242")
    fs.write(u / "svc" / "cgroup.subtree_control", "+cpu")  # empty now: allowed
    with pytest.raises(OSError) as info:
        fs.write(u / "svc" / "cgroup.procs", "4343")
    assert info.value.errno == errno.EBUSY


def test_kill_drains_asynchronously(tmp_path: Path) -> None:
    fs, u = v2_root(tmp_path, drain_polls=3)
    fs.mkdir(u / "vm")
    fs.write(u / "vm" / "cgroup.procs", "777")
    fs.write(u / "vm" / "cgroup.kill", "1")
    assert fs.killed == [777]
    for _ in range(2):
        assert fs.read(u / "vm" / "cgroup.events").startswith("populated 1")
        with pytest.raises(OSError) as info:
            fs.rmdir(u / "vm")
        assert info.value.errno == errno.EBUSY
    assert fs.read(u / "vm" / "cgroup.events").startswith("populated 0")
    fs.rmdir(u / "vm")
    assert not (u / "vm").exists()


def plan(tmp_path: Path, fs: FakeKernel, u: Path) -> VmCgroups:
    layout = CgroupLayout("v2", {}, u, frozenset({"cpu", "memory"}), {"": "/"})
    settings = cgroup_settings(JailerConfig(), 2, None)
    return VmCgroups.plan(layout, 2, "vm1", settings, None, tmp_path / "lock", fs=fs)


def test_remove_waits_for_the_drain(tmp_path: Path) -> None:
    fs, u = v2_root(tmp_path, drain_polls=5)
    fs.write(u / "cgroup.subtree_control", "+cpu +memory")
    vm = plan(tmp_path, fs, u)
    vm.prepare()
    vm.attach(999, everywhere=True)
    vm.remove(timeout_s=30)
    assert fs.killed == [999]
    release_chains([tmp_path / "lock"])  # the parent chain, as at this process's exit
    assert not (u / "ironclaw").exists()


def test_remove_reports_processes_that_never_leave(tmp_path: Path) -> None:
    fs, u = v2_root(tmp_path, drain_polls=10**9)  # uninterruptible sleep, say
    fs.write(u / "cgroup.subtree_control", "+cpu +memory")
    vm = plan(tmp_path, fs, u)
    vm.prepare()
    vm.attach(999, everywhere=True)
    with pytest.raises(CleanupError, match=r"still holds pids \[999\]"):
        vm.remove(timeout_s=0.2)
    assert vm.paths["unified"].is_dir()  # busy: left, and named
    fs.dying.clear()
    fs.write(u / "cgroup.procs", "999")  # moved out to the root: now removable
    vm.remove(timeout_s=1)
    release_chains([tmp_path / "lock"])
    assert not (u / "ironclaw").exists()
