"""doctor for a non-root user: what works now (development mode), what jailed mode needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from ironclaw_orchestrator import doctor
from ironclaw_orchestrator.doctor import Check, HostPaths, Status
from ironclaw_orchestrator.gc.user import UnprivilegedGcHost, gc_host_for_user

USER = HostPaths(geteuid=lambda: 1000)


def _checks(*failing: str) -> list[Check]:
    names = ["root", "kvm", "firecracker", "jailer", "versions", "cgroup cpu", "chroot base",
             "network namespaces", "socket path budget"]  # fmt: skip
    return [
        Check(
            n, Status.FAIL if n in failing else Status.PASS, "v", f"fix {n}" if n in failing else ""
        )
        for n in names
    ]


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("IRONCLAW_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("IRONCLAW_STATE_DIR", str(tmp_path / "run" / "registry"))
    return tmp_path


def test_development_mode_passes_with_kvm_firecracker_and_writable_dirs(dirs: Path) -> None:
    check = doctor.check_development_mode(_checks("root", "cgroup cpu", "chroot base"), USER)
    assert check.status is Status.PASS
    assert "uid 1000" in check.value and str(dirs / "run") in check.value
    assert not (dirs / "run").exists()  # looked at, not made


def test_development_mode_names_each_missing_piece(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    locked = tmp_path / "locked"
    locked.write_text("not a directory")
    monkeypatch.setenv("IRONCLAW_RUN_DIR", str(locked / "run"))
    monkeypatch.setenv("IRONCLAW_STATE_DIR", str(tmp_path / "state"))
    check = doctor.check_development_mode(_checks("root", "kvm", "firecracker"), USER)
    assert check.status is Status.FAIL
    assert "kvm: fix kvm" in check.fix and "firecracker: fix firecracker" in check.fix
    assert f"run dir {locked / 'run'} is not writable" in check.fix
    assert "IRONCLAW_RUN_DIR" in check.fix and "state dir" not in check.fix


def test_jailed_mode_needs_root_plus_what_root_would_not_fix() -> None:
    check = doctor.check_jailed_mode(
        _checks("root", "jailer", "versions", "cgroup cpu", "chroot base", "network namespaces"),
        USER,
    )
    assert check.status is Status.FAIL
    assert check.value == "not available: needs root, jailer, versions"
    assert check.details["needs"][1:] == ["jailer: fix jailer", "versions: fix versions"]
    assert "uid 1000" in check.fix and "sudo ironclaw doctor" in check.fix
    assert "cgroup cpu" not in check.value  # may well pass as root: re-checked with sudo


def test_static_checks_add_both_rows_only_when_not_root(dirs: Path) -> None:
    as_user = [c.name for c in doctor.run_static_checks(host=HostPaths(geteuid=lambda: 1000))]
    assert as_user[-2:] == ["development mode", "jailed mode"]
    as_root = [c.name for c in doctor.run_static_checks(host=HostPaths(geteuid=lambda: 0))]
    assert "development mode" not in as_root and "jailed mode" not in as_root


def test_gc_as_user_sees_no_host_wide_resources(tmp_path: Path) -> None:
    netns = tmp_path / "netns"
    netns.mkdir()
    (netns / "ironclaw-someone-elses").touch()
    host = UnprivilegedGcHost(netns_dir=netns)
    assert host.list_netns() == []
    assert host.cgroup_parent_dirs([]) == []
    assert gc_host_for_user(0) == (None, True)
    user_host, scan_jails = gc_host_for_user(1000)
    assert isinstance(user_host, UnprivilegedGcHost) and scan_jails is False
