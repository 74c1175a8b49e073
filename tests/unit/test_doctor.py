"""``ironclaw_orchestrator.doctor`` against fake hosts under tmp_path (no root, no VMs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ironclaw_orchestrator import doctor
from ironclaw_orchestrator.doctor import Check, DoctorReport, HostPaths, Status
from ironclaw_orchestrator.vm.config import JailerConfig


def fake_binary(path: Path, version_line: str) -> Path:
    path.write_text(f"#!/bin/sh\necho '{version_line}'\n")
    path.chmod(0o755)
    return path


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


# --------------------------------------------------------------------------- kvm, root


def test_missing_kvm(tmp_path: Path) -> None:
    check = doctor.check_kvm_device(HostPaths(kvm=tmp_path / "kvm"))
    assert check.status is Status.FAIL
    assert "does not exist" in check.value
    assert "modprobe" in check.fix


def test_kvm_present(tmp_path: Path) -> None:
    kvm = tmp_path / "kvm"
    kvm.write_bytes(b"")
    assert doctor.check_kvm_device(HostPaths(kvm=kvm)).status is Status.PASS


def test_not_root() -> None:
    check = doctor.check_root(HostPaths(geteuid=lambda: 1000))
    assert check.status is Status.FAIL
    assert "1000" in check.value
    assert doctor.check_root(HostPaths(geteuid=lambda: 0)).status is Status.PASS


# --------------------------------------------------------------------------- binaries


def test_missing_binaries(tmp_path: Path) -> None:
    config = JailerConfig(jailer_binary=tmp_path / "jailer", exec_file=tmp_path / "firecracker")
    checks, found = doctor.check_binaries(config)
    named = by_name(checks)
    assert found is None
    assert named["firecracker"].status is Status.FAIL
    assert named["jailer"].status is Status.FAIL
    assert str(tmp_path / "jailer") in named["jailer"].value
    assert named["versions"].status is Status.FAIL
    assert "ironclaw install" in named["jailer"].fix


def test_version_mismatch(tmp_path: Path) -> None:
    config = JailerConfig(
        jailer_binary=fake_binary(tmp_path / "jailer", "Jailer v1.1.0"),
        exec_file=fake_binary(tmp_path / "firecracker", "Firecracker v1.0.0"),
    )
    named = by_name(doctor.check_binaries(config)[0])
    assert named["firecracker"].status is Status.PASS
    assert "v1.0.0" in named["firecracker"].value
    assert named["jailer"].status is Status.PASS
    versions = named["versions"]
    assert versions.status is Status.FAIL
    assert "v1.1.0" in versions.value and "v1.0.0" in versions.value
    assert "--version" in versions.fix


def test_versions_match(tmp_path: Path) -> None:
    config = JailerConfig(
        jailer_binary=fake_binary(tmp_path / "jailer", "Jailer v1.0.0"),
        exec_file=fake_binary(tmp_path / "firecracker", "Firecracker v1.0.0"),
    )
    checks, found = doctor.check_binaries(config)
    assert found == tmp_path / "firecracker"
    assert by_name(checks)["versions"].status is Status.PASS


def test_binary_without_version(tmp_path: Path) -> None:
    config = JailerConfig(
        jailer_binary=fake_binary(tmp_path / "jailer", "hello"),
        exec_file=fake_binary(tmp_path / "firecracker", "Firecracker v1.0.0"),
    )
    named = by_name(doctor.check_binaries(config)[0])
    assert named["jailer"].status is Status.FAIL
    assert "is not jailer" in named["jailer"].value


# --------------------------------------------------------------------------- chroot base


def mountinfo(tmp_path: Path, point: Path, options: str, fs_type: str = "ext4") -> HostPaths:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True, exist_ok=True)
    (proc / "self" / "mountinfo").write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        f"40 22 0:50 / {point} {options} shared:2 - {fs_type} none rw\n"
    )
    return HostPaths(proc=proc)


def test_chroot_base_missing(tmp_path: Path) -> None:
    check = doctor.check_chroot_base_dir(tmp_path / "jail", HostPaths())
    assert check.status is Status.FAIL
    assert "mkdir -p" in check.fix


def test_chroot_base_not_a_directory(tmp_path: Path) -> None:
    base = tmp_path / "jail"
    base.write_text("")
    assert doctor.check_chroot_base_dir(base, HostPaths()).status is Status.FAIL


@pytest.mark.parametrize("option", ["noexec", "nodev"])
def test_chroot_base_noexec_nodev(tmp_path: Path, option: str) -> None:
    base = tmp_path / "jail"
    base.mkdir()
    host = mountinfo(tmp_path, base, f"rw,{option},relatime")
    check = doctor.check_chroot_base_dir(base, host)
    assert check.status is Status.FAIL
    assert option in check.value
    assert "remount" in check.fix
    assert list(base.iterdir()) == []  # the writability probe was removed


def test_chroot_base_tmpfs_warns(tmp_path: Path) -> None:
    base = tmp_path / "jail"
    base.mkdir()
    check = doctor.check_chroot_base_dir(base, mountinfo(tmp_path, base, "rw", "tmpfs"))
    assert check.status is Status.WARN
    assert "tmpfs" in check.value


def test_chroot_base_ok(tmp_path: Path) -> None:
    base = tmp_path / "jail"
    base.mkdir()
    check = doctor.check_chroot_base_dir(base, mountinfo(tmp_path, base, "rw,relatime"))
    assert check.status is Status.PASS
    assert list(base.iterdir()) == []


# --------------------------------------------------------------------------- socket budget


def test_socket_budget_fits() -> None:
    check = doctor.check_socket_budget_for(JailerConfig(chroot_base_dir=Path("/j")), "fc")
    assert check.status is Status.PASS
    assert check.details["bytes"] == len(f"/j/fc/{'x' * 64}/root/run/firecracker.socket")


def test_socket_budget_limits_ids() -> None:
    check = doctor.check_socket_budget_for(JailerConfig(), "firecracker")
    # /var/jail/firecracker/<64>/root/run/firecracker.socket = 114 bytes: 7 over.
    assert check.status is Status.WARN
    assert check.details["max_id_length"] == 57
    assert "57" in check.fix


def test_socket_budget_impossible() -> None:
    config = JailerConfig(chroot_base_dir=Path("/" + "b" * 60))
    check = doctor.check_socket_budget_for(config, "firecracker-v1.14.1-x86_64")
    assert check.status is Status.FAIL


# --------------------------------------------------------------------------- netns


def fake_proc(tmp_path: Path, *, netns: bool) -> Path:
    proc = tmp_path / "proc"
    (proc / "self" / "ns").mkdir(parents=True, exist_ok=True)
    if netns:
        (proc / "self" / "ns" / "net").write_text("")
    return proc


def test_netns_unsupported(tmp_path: Path) -> None:
    host = HostPaths(proc=fake_proc(tmp_path, netns=False), netns_dir=tmp_path / "netns")
    named = by_name(doctor.check_netns(JailerConfig(), host))
    assert named["network namespaces"].status is Status.FAIL
    # Without an isolated netns it is only a warning.
    named = by_name(doctor.check_netns(JailerConfig(isolate_network=False), host))
    assert named["network namespaces"].status is Status.WARN


def test_netns_dir_creatable(tmp_path: Path) -> None:
    host = HostPaths(
        proc=fake_proc(tmp_path, netns=True),
        netns_dir=tmp_path / "run" / "netns",
        tun=tmp_path / "tun",
    )
    named = by_name(doctor.check_netns(JailerConfig(), host))
    assert named["network namespaces"].status is Status.PASS
    assert "can be created" in named["network namespaces"].value
    assert not (tmp_path / "run").exists()  # nothing was created
    assert named["tun device"].status is Status.WARN


# --------------------------------------------------------------------------- cgroups


def fake_cgroup_v2(tmp_path: Path, controllers: str, own: str = "/") -> tuple[HostPaths, Path]:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True, exist_ok=True)
    mount = tmp_path / "cgroup"
    mount.mkdir()
    (mount / "cgroup.controllers").write_text(controllers + "\n")
    (proc / "self" / "mountinfo").write_text(
        f"30 1 0:26 / {mount} rw,nosuid,nodev,noexec shared:4 - cgroup2 cgroup2 rw\n"
    )
    (proc / "self" / "cgroup").write_text(f"0::{own}\n")
    return HostPaths(proc=proc), mount


def test_cgroup_v2_controllers(tmp_path: Path) -> None:
    host, mount = fake_cgroup_v2(tmp_path, "cpu memory pids")
    named = by_name(doctor.check_cgroups(JailerConfig(), host))
    assert named["cgroup layout"].status is Status.PASS
    assert "v2" in named["cgroup layout"].value
    assert named["cgroup cpu"].status is Status.PASS
    assert named["cgroup memory"].status is Status.PASS
    assert named["cgroup pids"].status is Status.PASS
    assert named["cgroup cpuset"].status is Status.WARN
    assert named["cgroup io"].status is Status.WARN
    # Every probe directory was removed again.
    assert [p.name for p in mount.iterdir()] == ["cgroup.controllers"]


def test_cgroup_required_controller_missing(tmp_path: Path) -> None:
    host, _ = fake_cgroup_v2(tmp_path, "cpu pids")
    named = by_name(doctor.check_cgroups(JailerConfig(), host))
    assert named["cgroup layout"].status is Status.FAIL
    assert named["cgroup memory"].status is Status.FAIL


def test_cgroup_own_cgroup_not_writable(tmp_path: Path) -> None:
    host, _ = fake_cgroup_v2(tmp_path, "cpu memory", own="/does/not/exist")
    named = by_name(doctor.check_cgroups(JailerConfig(), host))
    assert named["cgroup cpu"].status is Status.FAIL
    assert "cannot create VM cgroups" in named["cgroup cpu"].value


def test_cgroup_v2_internal_processes(tmp_path: Path) -> None:
    # The kernel allows a non-root cgroup processes or controllers enabled for its
    # children, never both: the orchestrator's own cgroup holding it delegates nothing.
    host, mount = fake_cgroup_v2(tmp_path, "cpu memory", own="/svc")
    (mount / "svc").mkdir()
    (mount / "svc" / "cgroup.procs").write_text(f"{os.getpid()}\n")
    (mount / "svc" / "cgroup.subtree_control").write_text("")
    named = by_name(doctor.check_cgroups(JailerConfig(), host))
    for ctrl in ("cpu", "memory"):
        assert named[f"cgroup {ctrl}"].status is Status.FAIL
        assert "EBUSY" in named[f"cgroup {ctrl}"].value


def test_cgroup_v2_root_cgroup_is_exempt(tmp_path: Path) -> None:
    # The root cgroup may hold processes and enable controllers for its children.
    host, mount = fake_cgroup_v2(tmp_path, "cpu memory", own="/")
    (mount / "cgroup.procs").write_text(f"1\n{os.getpid()}\n")
    (mount / "cgroup.subtree_control").write_text("")
    named = by_name(doctor.check_cgroups(JailerConfig(), host))
    assert named["cgroup cpu"].status is Status.PASS
    assert named["cgroup memory"].status is Status.PASS


def test_no_cgroups(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text("")
    checks = doctor.check_cgroups(JailerConfig(), HostPaths(proc=proc))
    assert [(c.name, c.status) for c in checks] == [("cgroup layout", Status.FAIL)]


def test_cgroup_v1_uses_blkio(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    lines = []
    for i, ctrl in enumerate(["cpu", "memory", "blkio"]):
        (tmp_path / ctrl).mkdir()
        lines.append(f"{40 + i} 1 0:{30 + i} / {tmp_path / ctrl} rw - cgroup cgroup rw,{ctrl}")
    (proc / "self" / "mountinfo").write_text("\n".join(lines) + "\n")
    (proc / "self" / "cgroup").write_text("3:blkio:/\n2:memory:/\n1:cpu:/\n")
    named = by_name(doctor.check_cgroups(JailerConfig(), HostPaths(proc=proc)))
    assert named["cgroup layout"].value.startswith("v1")
    assert named["cgroup io"].status is Status.PASS
    assert str(tmp_path / "blkio") in named["cgroup io"].value
    assert named["cgroup pids"].status is Status.WARN
    assert "pids" in named["cgroup pids"].fix


# --------------------------------------------------------------------------- report


def test_report_ok_and_dict() -> None:
    report = DoctorReport(
        [Check("a", Status.PASS, "x"), Check("b", Status.WARN, "y", "do z", {"n": 1})]
    )
    assert report.ok
    doc = report.to_dict()
    assert doc["ok"] is True
    assert doc["summary"] == {"pass": 1, "warn": 1, "fail": 0}
    assert doc["checks"] == [
        {"name": "a", "status": "pass", "value": "x", "fix": "", "details": {}},
        {"name": "b", "status": "warn", "value": "y", "fix": "do z", "details": {"n": 1}},
    ]
    failed = DoctorReport([*report.checks, Check("c", Status.FAIL, "bad", "fix")])
    assert not failed.ok
    assert [c.name for c in failed.failures] == ["c"]


async def test_run_checks_static_on_fake_host(tmp_path: Path) -> None:
    host, _ = fake_cgroup_v2(tmp_path, "cpu memory")
    host = HostPaths(
        kvm=tmp_path / "nokvm", proc=host.proc, netns_dir=tmp_path / "netns",
        tun=tmp_path / "tun", geteuid=lambda: 1000,
    )  # fmt: skip
    config = JailerConfig(
        jailer_binary=fake_binary(tmp_path / "jailer", "Jailer v1.0.0"),
        exec_file=fake_binary(tmp_path / "firecracker", "Firecracker v1.0.0"),
        chroot_base_dir=tmp_path / "missing-jail",
    )
    report = await doctor.run_checks(config, host=host)
    named = by_name(report.checks)
    assert not report.ok
    assert {c.name for c in report.failures} >= {"root", "kvm", "chroot base"}
    assert named["versions"].status is Status.PASS
    assert not any(c.name.startswith("live") for c in report.checks)
