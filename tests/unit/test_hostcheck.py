"""``vm.hostcheck``: one home per host check, shared by the launch path and ``ironclaw doctor``.

Each case runs the same fake host through the raising ``check_*`` the launch path uses and
through doctor, and asserts they agree (no root, no VMs; fake trees under tmp_path).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ironclaw_orchestrator import doctor
from ironclaw_orchestrator.doctor import HostPaths, Status
from ironclaw_orchestrator.errors import ChrootBaseError, ConfigError, KvmUnavailableError
from ironclaw_orchestrator.vm import hostcheck
from ironclaw_orchestrator.vm.config import MAX_SOCKET_PATH_BYTES, JailerConfig


def fake_mountinfo(tmp_path: Path, point: Path, options: str, fs_type: str = "ext4") -> Path:
    path = tmp_path / "mountinfo"
    path.write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        f"40 22 0:50 / {point} {options} shared:2 - {fs_type} none rw\n"
    )
    return path


def doctor_host(mountinfo: Path) -> HostPaths:
    proc = mountinfo.parent / "proc"
    (proc / "self").mkdir(parents=True, exist_ok=True)
    (proc / "self" / "mountinfo").write_text(mountinfo.read_text())
    return HostPaths(proc=proc)


def test_missing_kvm_fails_both_ways_with_the_same_words(tmp_path: Path) -> None:
    kvm = tmp_path / "kvm"
    finding = hostcheck.inspect_kvm(kvm)
    assert finding.failed and "modprobe" in finding.fix
    with pytest.raises(KvmUnavailableError) as info:
        hostcheck.check_kvm(kvm)
    assert str(info.value) == finding.message
    assert str(kvm) in str(info.value) and "does not exist" in str(info.value)
    check = doctor.check_kvm_device(HostPaths(kvm=kvm))
    assert (check.status, check.value, check.fix) == (Status.FAIL, finding.value, finding.fix)


def test_usable_kvm_passes(tmp_path: Path) -> None:
    kvm = tmp_path / "kvm"
    kvm.write_bytes(b"")
    assert hostcheck.inspect_kvm(kvm).level == "pass"
    hostcheck.check_kvm(kvm)


def test_root_is_judged_once() -> None:
    assert hostcheck.is_root(lambda: 0)
    assert not hostcheck.is_root(lambda: 1000)
    check = doctor.check_root(HostPaths(geteuid=lambda: 1000))
    assert check.status is Status.FAIL and "1000" in check.value and "root" in check.fix


def test_missing_chroot_base(tmp_path: Path) -> None:
    base = tmp_path / "jail"
    with pytest.raises(ChrootBaseError) as info:
        hostcheck.check_chroot_base(base)
    assert str(base) in str(info.value) and "mkdir -p" in str(info.value)
    check = doctor.check_chroot_base_dir(base, HostPaths())
    assert check.status is Status.FAIL and f"mkdir -p {base}" in check.fix


def test_chroot_base_that_is_a_file(tmp_path: Path) -> None:
    base = tmp_path / "jail"
    base.write_text("")
    with pytest.raises(ChrootBaseError, match="not a directory"):
        hostcheck.check_chroot_base(base)


@pytest.mark.parametrize("option", ["noexec", "nodev"])
def test_chroot_base_noexec_nodev_refused_by_both(tmp_path: Path, option: str) -> None:
    base = tmp_path / "jail"
    base.mkdir()
    mountinfo = fake_mountinfo(tmp_path, base, f"rw,{option}")
    with pytest.raises(ChrootBaseError) as info:
        hostcheck.check_chroot_base(base, mountinfo=mountinfo)
    assert option in str(info.value) and "remount" in str(info.value)
    check = doctor.check_chroot_base_dir(base, doctor_host(mountinfo))
    assert check.status is Status.FAIL and option in check.value
    assert list(base.iterdir()) == []  # doctor's write probe was removed


def test_tmpfs_chroot_base_is_only_a_warning(tmp_path: Path) -> None:
    base = tmp_path / "jail"
    base.mkdir()
    mountinfo = fake_mountinfo(tmp_path, base, "rw", "tmpfs")
    hostcheck.check_chroot_base(base, mountinfo=mountinfo)  # the launch path goes on
    finding = hostcheck.inspect_chroot_base(base, mountinfo=mountinfo)
    assert finding.level == "warn" and "tmpfs" in finding.value


def test_unreadable_mountinfo_is_a_warning_not_a_crash(tmp_path: Path) -> None:
    base = tmp_path / "jail"
    base.mkdir()
    missing = tmp_path / "no-mountinfo"
    hostcheck.check_chroot_base(base, mountinfo=missing)
    assert hostcheck.inspect_chroot_base(base, mountinfo=missing).level == "warn"


def test_socket_budget_shares_the_byte_count(tmp_path: Path) -> None:
    fits = Path("/") / ("s" * (MAX_SOCKET_PATH_BYTES - 1))
    hostcheck.check_socket_budget(fits)
    too_long = Path("/") / ("s" * MAX_SOCKET_PATH_BYTES)
    assert hostcheck.socket_path_bytes(too_long) == MAX_SOCKET_PATH_BYTES + 1
    with pytest.raises(ConfigError, match=r"by 1 bytes"):
        hostcheck.check_socket_budget(too_long)
    finding = hostcheck.inspect_socket_budget(JailerConfig(), "firecracker")
    check = doctor.check_socket_budget_for(JailerConfig(), "firecracker")
    assert (check.status.value, check.details) == (finding.level, finding.details)


def test_netns_and_tun_findings(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "self" / "ns").mkdir(parents=True)
    missing = hostcheck.inspect_netns_support(proc=proc, netns_dir=tmp_path / "netns")
    assert missing.failed and "CONFIG_NET_NS" in missing.fix
    optional = hostcheck.inspect_netns_support(
        proc=proc, netns_dir=tmp_path / "netns", needed=False
    )
    assert optional.level == "warn"
    assert hostcheck.inspect_tun(tmp_path / "tun").level == "warn"


def test_a_passing_chroot_base_is_checked_once_until_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    real = hostcheck.inspect_chroot_base

    def counting(base: Path, **kw: object) -> hostcheck.Finding:
        calls.append(base)
        return real(base, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(hostcheck, "inspect_chroot_base", counting)
    monkeypatch.setattr(hostcheck, "_chroot_bases_ok", set())
    base = tmp_path / "jails"
    base.mkdir()
    hostcheck.check_chroot_base(base)
    hostcheck.check_chroot_base(base)
    assert len(calls) == 1  # the second start reuses the verdict
    base.chmod(0o711)  # mode, owner, inode, device or mount flags: checked again
    hostcheck.check_chroot_base(base)
    assert len(calls) == 2
    base.rmdir()
    with pytest.raises(ChrootBaseError, match="does not exist"):
        hostcheck.check_chroot_base(base)
